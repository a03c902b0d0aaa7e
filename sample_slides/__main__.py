"""``python -m sample_slides [FOLDER]``: write the sample slides (default: this folder)."""

import sys
from pathlib import Path

from sample_slides.generate import write_samples

folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
for path in write_samples(folder):
    print(f"wrote {path} ({path.stat().st_size // 1024} kB)")
