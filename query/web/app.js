// hexatlas map page: one resolution of an atlas, each H3 cell coloured by the first three
// principal components of its embedding; a click lists and outlines the most similar places.
// Talks only to this server's /v1 API. The page's state is mirrored in window.hexatlasState
// (status, model, res, cells, selected, similar, error) for scripts and tests;
// window.hexatlasPolygons() returns the cells' outlines as drawn.
"use strict";

const MAX_MAP_CELLS = 300000; // the server refuses larger layers (query/mapping.py)
const state = { status: "loading", model: null, res: null, cells: 0, selected: null, similar: [], error: null };
window.hexatlasState = state;

const $ = (id) => document.getElementById(id);
let deckgl = null;
let info = null;
let land = null;
let cellsLayer = null;
let drawnPolygons = [];
window.hexatlasPolygons = () => drawnPolygons;

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || response.statusText);
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
  if (isError) {
    state.status = "error";
    state.error = text;
  }
}

function option(select, value, label, selected) {
  const el = document.createElement("option");
  el.value = value;
  el.textContent = label;
  el.selected = selected;
  select.appendChild(el);
}

function fillResolutions() {
  const select = $("res");
  select.textContent = "";
  const resolutions = Object.entries(info[state.model].resolutions).map(([r, d]) => [Number(r), d.cells]);
  const drawable = resolutions.filter(([, cells]) => cells <= MAX_MAP_CELLS).map(([r]) => r);
  const preferred = drawable.length ? Math.max(...drawable) : null;
  for (const [r, cells] of resolutions) {
    option(select, r, `${r} (${cells.toLocaleString()} cells)`, r === preferred);
  }
  return preferred;
}

const MERCATOR_LAT = 85.051129; // the map's top and bottom edge (Web Mercator)

// A cell's outline as [lng, lat] vertices, unwrapped so that no edge jumps 360 degrees (as the
// PNG of query/mapping.py draws cells); a cell round a pole is closed along the map's top or
// bottom edge. A ring may then run past +-180.
function cellRing(cell) {
  const ring = h3.cellToBoundary(cell).map(([lat, lng]) => [lng, lat]);
  for (let i = 1; i < ring.length; i++) {
    let step = ring[i][0] - ring[i - 1][0];
    step -= 360 * Math.round(step / 360);
    ring[i][0] = ring[i - 1][0] + step;
  }
  const first = ring[0];
  const last = ring[ring.length - 1];
  let closing = first[0] - last[0];
  closing -= 360 * Math.round(closing / 360);
  const winding = last[0] - first[0] + closing;
  if (Math.abs(winding) > 180) { // round a pole
    const pole = ring.reduce((sum, p) => sum + p[1], 0) > 0 ? 90 : -90;
    const end = first[0] + winding;
    ring.push([end, first[1]], [end, pole], [first[0], pole]);
  }
  return ring;
}

// The part of a ring where coordinate ``axis`` (0: lng, 1: lat) is <= ``limit`` (``below``) or
// >= it: Sutherland-Hodgman on one half-plane.
function clip(ring, axis, limit, below) {
  const inside = (p) => (below ? p[axis] <= limit : p[axis] >= limit);
  const out = [];
  ring.forEach((a, i) => {
    const b = ring[(i + 1) % ring.length];
    if (inside(a)) out.push(a);
    if (inside(a) !== inside(b)) {
      const t = (limit - a[axis]) / (b[axis] - a[axis]);
      out.push(axis === 0 ? [limit, a[1] + t * (b[1] - a[1])] : [a[0] + t * (b[0] - a[0]), limit]);
    }
  });
  return out;
}

function ringArea(ring) {
  return Math.abs(ring.reduce((sum, a, i) => {
    const b = ring[(i + 1) % ring.length];
    return sum + a[0] * b[1] - b[0] * a[1];
  }, 0)) / 2;
}

// A cell's outline cut at the antimeridian: one polygon for most cells, two (one each side) for a
// cell that crosses it, each within -180..180, so every cell is drawn once in each world copy and
// no polygon stretches across the map as a band. Cut at the map's top and bottom too (Web
// Mercator cannot show the poles).
function cellPolygons(cell) {
  const ring = cellRing(cell);
  const pieces = [];
  for (const shift of [-360, 0, 360]) {
    const shifted = ring.map(([x, y]) => [x + shift, y]);
    let piece = clip(clip(shifted, 0, 180, true), 0, -180, false);
    piece = clip(clip(piece, 1, MERCATOR_LAT, true), 1, -MERCATOR_LAT, false);
    if (piece.length >= 3 && ringArea(piece) > 1e-9) pieces.push(piece);
  }
  return pieces;
}
window.hexatlasCellPolygons = cellPolygons;

function outlineLayer(id, cells, color, width) {
  return new deck.PolygonLayer({
    id, data: cells.flatMap((cell) => cellPolygons(cell).map((polygon) => ({ cell, polygon }))),
    getPolygon: (d) => d.polygon,
    filled: false, stroked: true, getLineColor: color, lineWidthMinPixels: width,
  });
}

function render() {
  const layers = [cellsLayer];
  if (land) {
    layers.push(new deck.GeoJsonLayer({
      id: "land", data: land, filled: false, stroked: true, wrapLongitude: true,
      getLineColor: [255, 255, 255, 140], lineWidthMinPixels: 0.8,
    }));
  }
  if (state.similar.length) {
    layers.push(outlineLayer("similar", state.similar.map((r) => r.cell), [255, 230, 0], 2.5));
  }
  if (state.selected) {
    layers.push(outlineLayer("selected", [state.selected], [255, 255, 255], 4));
  }
  deckgl.setProps({ layers });
}

async function loadLayer() {
  state.status = "loading";
  state.selected = null;
  state.similar = [];
  $("similar").textContent = "";
  $("similar-title").hidden = true;
  setStatus(`loading resolution ${state.res}…`);
  const data = await getJSON(`v1/map?model=${encodeURIComponent(state.model)}&res=${state.res}`);
  const rows = data.cells.flatMap((cell, i) => {
    const color = data.colors.slice(3 * i, 3 * i + 3);
    return cellPolygons(cell).map((polygon) => ({ cell, color, polygon }));
  });
  // Polygons cut here (cellPolygons) rather than deck.gl's H3HexagonLayer, which leaves cells on
  // the antimeridian and round the poles to the map's world copies, drawn only where those are.
  cellsLayer = new deck.PolygonLayer({
    id: `cells-${data.model}-${data.res}`, data: rows, getPolygon: (d) => d.polygon, getFillColor: (d) => d.color,
    filled: true, stroked: false, extruded: false, pickable: true,
  });
  drawnPolygons = rows.map((r) => r.polygon);
  const pct = data.explained_variance.map((v) => `${(100 * v).toFixed(1)}%`);
  $("legend").textContent = `${info[data.model].model}, H3 resolution ${data.res}: colour = principal components `
    + `1, 2, 3 of the embeddings as red, green, blue (${pct.join(", ")} of the variance). Click a place.`;
  state.cells = data.cells.length;
  render();
  state.status = "ready";
  setStatus(`${data.cells.length.toLocaleString()} cells`);
}

async function showSimilar(query, label) {
  state.status = "searching";
  setStatus(`searching places like ${label}…`);
  const params = new URLSearchParams({ model: state.model, res: state.res, k: 10, ...query });
  const exclude = Number($("exclude").value);
  if (exclude > 0) params.set("exclude_within_km", exclude);
  const result = await getJSON(`v1/similar?${params}`);
  state.selected = query.cell || (result.results.length ? result.results[0].cell : null);
  state.similar = result.results;
  const list = $("similar");
  list.textContent = "";
  for (const r of result.results) {
    const item = document.createElement("li");
    item.textContent = `${r.lat.toFixed(2)}, ${r.lon.toFixed(2)}  cosine ${r.score.toFixed(3)}`;
    item.title = r.cell;
    list.appendChild(item);
  }
  $("similar-title").hidden = false;
  $("similar-title").textContent = `Most similar to ${label}`;
  render();
  state.status = "ready";
  setStatus(`${state.cells.toLocaleString()} cells`);
}

function onClick(picked) {
  let query;
  let label;
  if (picked.object) {
    query = { cell: picked.object.cell };
    label = `cell ${picked.object.cell}`;
  } else if (picked.coordinate) { // a land-only atlas has no cell under the ocean: search from the point
    const lon = ((((picked.coordinate[0] + 180) % 360) + 360) % 360) - 180;
    const lat = Math.max(-90, Math.min(90, picked.coordinate[1]));
    query = { lat, lon };
    label = `${lat.toFixed(2)}, ${lon.toFixed(2)}`;
  } else {
    return;
  }
  showSimilar(query, label).catch((err) => setStatus(err.message, true));
}

// Clicks are read from the DOM rather than deck.gl's gesture recogniser, which stays silent for
// synthetic (scripted or test-driven) pointer events; a press that moved is a drag, not a click.
function listenForClicks(element) {
  let downAt = null;
  element.addEventListener("pointerdown", (e) => { downAt = [e.clientX, e.clientY]; }, true);
  element.addEventListener("click", (e) => {
    if (!downAt || Math.hypot(e.clientX - downAt[0], e.clientY - downAt[1]) > 4 || !cellsLayer) return;
    const rect = element.getBoundingClientRect();
    const x = e.clientX - rect.left;
    const y = e.clientY - rect.top;
    const picked = deckgl.pickObject({ x, y, layerIds: [cellsLayer.id] });
    onClick({ object: picked && picked.object, coordinate: deckgl.getViewports()[0].unproject([x, y]) });
  }, true);
}

// Screen position of a place, for scripts driving the page (the browser test clicks with it).
window.hexatlasProject = (lon, lat) => deckgl.getViewports()[0].project([lon, lat]);

async function main() {
  info = await getJSON("v1/info");
  const models = Object.keys(info);
  state.model = models[0];
  for (const m of models) option($("model"), m, `${m} (${info[m].dim}-d)`, m === state.model);
  state.res = fillResolutions();
  deckgl = new deck.Deck({
    parent: $("map"),
    views: new deck.MapView({ repeat: true }),
    initialViewState: { longitude: 0, latitude: 20, zoom: 1.1 },
    controller: true,
    layers: [],
    getTooltip: ({ object }) => object && `${object.cell}`,
  });
  listenForClicks($("map"));
  try {
    const topology = await getJSON("static/land-110m.json");
    land = topojson.feature(topology, topology.objects.land);
  } catch (err) {
    land = null; // outlines are a nicety; the cells carry the map
  }
  $("model").onchange = (e) => {
    state.model = e.target.value;
    state.res = fillResolutions();
    loadLayer().catch((err) => setStatus(err.message, true));
  };
  $("res").onchange = (e) => {
    state.res = Number(e.target.value);
    loadLayer().catch((err) => setStatus(err.message, true));
  };
  if (state.res === null) {
    setStatus(`every resolution of ${state.model} has more than ${MAX_MAP_CELLS.toLocaleString()} cells`, true);
    return;
  }
  await loadLayer();
}

main().catch((err) => setStatus(err.message, true));
