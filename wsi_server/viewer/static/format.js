// Pure helpers shared by the library and the viewer pages: units, numbers, magnification.

/** Standard objective magnifications offered as buttons (up to the scan's own). */
export const STANDARD_MAGNIFICATIONS = [1.25, 2.5, 5, 10, 20, 40];

export function escapeHtml(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

export function formatBytes(n) {
  if (n == null || !isFinite(n)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

export function formatInt(n) {
  return n == null ? "–" : Number(n).toLocaleString("en-US");
}

export function formatDimensions(w, h) {
  return w && h ? `${formatInt(w)} × ${formatInt(h)} px` : "–";
}

export function formatMpp(mpp) {
  if (!mpp || !mpp[0]) return "–";
  const [x, y] = mpp;
  const f = (v) => Number(v).toFixed(v < 1 ? 3 : 2);
  return Math.abs(x - y) / x < 0.005 ? `${f(x)} µm/px` : `${f(x)} × ${f(y)} µm/px`;
}

/** "1.25×", "10×", "0.31×". */
export function formatMagnification(m) {
  if (m == null || !isFinite(m)) return "–";
  const digits = m >= 10 ? 0 : m >= 1 ? (Number.isInteger(Math.round(m * 100) / 100) ? 0 : 2) : 2;
  let text = m.toFixed(digits);
  if (text.includes(".")) text = text.replace(/0+$/, "").replace(/\.$/, "");
  return `${text}×`;
}

/**
 * The objective power of the scan: the file's own when it says, else estimated from the
 * pixel size (0.25 µm/px ≈ 40×, the usual 10 µm ÷ mpp rule). `estimated` says which.
 */
export function scanPower(objectivePower, mpp) {
  if (objectivePower && objectivePower > 0) return { power: objectivePower, estimated: false };
  if (mpp && mpp[0] > 0) return { power: 10 / mpp[0], estimated: true };
  return { power: null, estimated: false };
}

/**
 * A scale bar: the longest "nice" length (1, 2 or 5 × 10^k µm) that fits in `maxPx` screen
 * pixels, given micrometres per screen pixel. Returns {um, px, label}.
 */
export function scaleBar(umPerPx, maxPx = 160) {
  if (!(umPerPx > 0) || !isFinite(umPerPx)) return null;
  const maxUm = umPerPx * maxPx;
  const exp = Math.floor(Math.log10(maxUm));
  let um = 0;
  for (const step of [5, 2, 1]) {
    const candidate = step * 10 ** exp;
    if (candidate <= maxUm) { um = candidate; break; }
  }
  if (!um) um = 10 ** exp;
  // Round away floating noise (e.g. 0.30000000000000004).
  um = Number(um.toPrecision(6));
  return { um, px: um / umPerPx, label: formatLength(um) };
}

export function formatLength(um) {
  if (um >= 1000) return `${Number((um / 1000).toPrecision(6))} mm`;
  if (um >= 1) return `${Number(um.toPrecision(6))} µm`;
  return `${Number((um * 1000).toPrecision(6))} nm`;
}

const FORMAT_NAMES = {
  aperio: "Aperio SVS", hamamatsu: "Hamamatsu NDPI", dicom: "DICOM-WSI",
  "generic-tiff": "Generic TIFF", "ome-tiff": "OME-TIFF", mirax: "3DHISTECH MRXS",
  leica: "Leica SCN", philips: "Philips TIFF", ventana: "Ventana BIF", zarr: "Zarr",
};

/** "Aperio SVS", "DICOM-WSI", or format and vendor as the server names them. */
export function describeFormat(slide) {
  const named = FORMAT_NAMES[String(slide.format || "").toLowerCase()];
  if (named) return named;
  const parts = [slide.format, slide.vendor].filter(Boolean);
  const uniq = parts.filter((p, i) => parts.findIndex((q) => q.toLowerCase() === p.toLowerCase()) === i);
  return uniq.length ? uniq.join(" · ") : "–";
}
