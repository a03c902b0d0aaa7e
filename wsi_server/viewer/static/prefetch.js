// Prefetch in the direction of travel: once a pan has settled and every tile of the view
// is drawn, fetch the tiles of the next screen the same way into the browser's HTTP cache
// (tile URLs are versioned and immutable), so that the next pan in that direction shows
// sharp tiles as soon as its animation ends. Readers pan in runs (along a row of tissue,
// then the next row), and they look at each screen for a while: that pause pays for the
// prefetch. Any new movement cancels what is still in flight, so a prefetch never queues
// in front of the tiles a user is waiting for.

/** The pan between two settled views at one zoom (image pixels), or null when the zoom
 *  changed or the view did not move. */
export function panBetween(before, after) {
  if (!before || !after || Math.abs(after.z / before.z - 1) > 0.01 || after.r !== before.r) {
    return null;
  }
  const dx = after.x - before.x;
  const dy = after.y - before.y;
  return Math.hypot(dx, dy) >= 1 ? { dx, dy } : null;
}

/** Tile columns and rows of a Deep Zoom level covering an image rectangle (image pixels). */
export function tilesCovering(rect, levelScale, tileSize, numTiles) {
  const first = (v) => Math.max(0, Math.floor((v * levelScale) / tileSize));
  const x0 = first(rect.x);
  const y0 = first(rect.y);
  const x1 = Math.min(numTiles.x - 1, Math.floor(((rect.x + rect.w) * levelScale) / tileSize));
  const y1 = Math.min(numTiles.y - 1, Math.floor(((rect.y + rect.h) * levelScale) / tileSize));
  const out = [];
  for (let y = y0; y <= y1; y++) for (let x = x0; x <= x1; x++) out.push([x, y]);
  return out;
}

/** The tiles of the view shifted once more by ``pan`` that the view itself does not
 *  need, nearest first. */
export function tilesAhead(view, pan, levelScale, tileSize, numTiles) {
  const have = new Set(tilesCovering(view, levelScale, tileSize, numTiles).map(String));
  const next = { ...view, x: view.x + pan.dx, y: view.y + pan.dy };
  const cx = (view.x + view.w / 2) * levelScale / tileSize;
  const cy = (view.y + view.h / 2) * levelScale / tileSize;
  return tilesCovering(next, levelScale, tileSize, numTiles)
    .filter((t) => !have.has(String(t)))
    .sort((a, b) => Math.hypot(a[0] - cx, a[1] - cy) - Math.hypot(b[0] - cx, b[1] - cy));
}

/**
 * Watch an OpenSeadragon viewer (one tiled image) and prefetch after each settled pan.
 * ``currentView()`` gives {x, y, z, r} (centre in image pixels). At most ``parallel``
 * requests at a time, at low priority. Returns {cancel, stats} (stats for the benchmarks).
 */
export function prefetchAhead(viewer, currentView, { parallel = 3, maxTiles = 80 } = {}) {
  let settled = null; // the last settled view
  let controller = null;
  const stats = { started: 0, fetched: 0, cancelled: 0 };

  const cancel = () => {
    if (controller) {
      controller.abort();
      controller = null;
    }
  };

  const run = async (urls, signal) => {
    let next = 0;
    const worker = async () => {
      while (next < urls.length && !signal.aborted) {
        const url = urls[next++];
        stats.started++;
        try {
          const r = await fetch(url, { signal, priority: "low", credentials: "same-origin" });
          await r.arrayBuffer(); // the body must be read for the cache to keep it
          stats.fetched++;
        } catch {
          if (signal.aborted) stats.cancelled++;
          return; // aborted, or the network is down: the real request will say so
        }
      }
    };
    await Promise.all(Array.from({ length: parallel }, worker));
  };

  const onSettled = () => {
    const item = viewer.world.getItemAt(0);
    if (!item || !item.getFullyLoaded() || viewer.viewport.getRotation(true) % 360) return;
    const now = currentView();
    const pan = panBetween(settled, now);
    settled = now;
    if (!pan) return;
    const drawn = item.getTilesToDraw().map((info) => info.tile.level);
    if (!drawn.length) return;
    const level = Math.max(...drawn);
    const source = item.source;
    const bounds = item.viewportToImageRectangle(viewer.viewport.getBounds(true));
    const view = { x: bounds.x, y: bounds.y, w: bounds.width, h: bounds.height };
    // getLevelScale: level pixels per full-resolution pixel
    const tiles = tilesAhead(view, pan, source.getLevelScale(level), source.getTileWidth(level),
      source.getNumTiles(level));
    const urls = tiles.slice(0, maxTiles).map(([x, y]) => source.getTileUrl(level, x, y));
    cancel();
    controller = new AbortController();
    run(urls, controller.signal);
  };

  // A view is settled when its tiles are all drawn and nothing moves; any movement ends a
  // prefetch in flight.
  viewer.world.addHandler("add-item", (e) => {
    e.item.addHandler("fully-loaded-change", (ev) => {
      if (ev.fullyLoaded && !viewer.isAnimating()) onSettled();
    });
  });
  viewer.addHandler("animation-start", cancel);
  viewer.addHandler("canvas-press", cancel);
  viewer.addHandler("animation-finish", () => {
    const item = viewer.world.getItemAt(0);
    if (item && item.getFullyLoaded()) onSettled();
  });
  return { cancel, stats };
}
