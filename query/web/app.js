// hexatlas map page: the cells in view, each coloured by the first three principal components of
// its embedding (the dataset's own basis, the same at every zoom), at the finest level the view
// allows: the globe from the atlas's overview levels, a city from its own cells. The page asks
// /v1/map again as you pan and zoom (debounced; the previous layer stays until the new one
// arrives). A click lists and outlines the most similar places.
// Talks only to this server's /v1 API. The page's state is mirrored in window.hexatlasState
// (status, model, res, source, fromRes, cells, mode, levels, selected, similar, error, requests,
// bytes, firstPaint, paintedAt) for scripts and tests; window.hexatlasPolygons() returns the
// cells' outlines as drawn, window.hexatlasGoTo(lon, lat, zoom) moves the view. The view is kept
// in the address (#map=ZOOM/LAT/LON), so a link opens where it was made.
"use strict";

const PIXELS_PER_CELL = 40; // the budget: a cell every ~6 x 6 pixels of the (padded) view
const MIN_BUDGET = 2000;
const MIN_CELL_PX = 3; // no level whose cells would be narrower than this on screen
const EDGE_KM_RES0 = 1281.256; // H3's mean hexagon edge at resolution 0; each level divides it by sqrt(7)
const PAD = 0.25; // the view asked for is a quarter wider each side: a short pan needs no request
const DEBOUNCE_MS = 250;
const MERCATOR_LAT = 85.051129; // the map's top and bottom edge (Web Mercator)
const SOURCE_TEXT = {
  held: () => "the atlas's own cells",
  overview: (r) => `overview: means of resolution ${r}`,
  averaged: (r) => `means of resolution ${r}, read in view`,
};

const state = {
  status: "loading", model: null, res: null, source: null, fromRes: null, cells: 0, mode: "auto", levels: [],
  selected: null, similar: [], error: null, requests: 0, bytes: 0, firstPaint: null, paintedAt: null,
  timing: {}, // of the last view, ms on the page clock: asked, answered, built (polygons), painted
};
window.hexatlasState = state;

const $ = (id) => document.getElementById(id);
let deckgl = null;
let info = null;
let land = null;
let cellsLayer = null;
let drawnPolygons = [];
let viewState = { longitude: 0, latitude: 20, zoom: 1.1, pitch: 0, bearing: 0 };
let fetched = null; // what the drawn layer covers: {bbox, zoom, key}
let pending = null; // the request in flight: {controller, seq}
let seq = 0;
let timer = null;
let painted = false;
let lastBytes = 0;
window.hexatlasPolygons = () => drawnPolygons;

async function getJSON(url, signal) {
  const response = await fetch(url, { signal });
  const text = await response.text();
  let body = {};
  try { body = JSON.parse(text); } catch (err) { body = {}; }
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || response.statusText);
    throw new Error(`${response.status}: ${detail}`);
  }
  lastBytes = text.length;
  return body;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
  state.error = isError ? text : null;
}

function fail(err) {
  setStatus(err.message, true);
  state.status = cellsLayer ? "ready" : "error"; // a refused view keeps the layer drawn before it
}

function option(select, value, label, selected) {
  const el = document.createElement("option");
  el.value = value;
  el.textContent = label;
  el.selected = selected;
  select.appendChild(el);
}

// The resolution menu: "auto" (follows the zoom), then each level the map draws.
function fillLevels(levels) {
  const key = JSON.stringify(levels);
  if (key === JSON.stringify(state.levels)) return;
  state.levels = levels;
  const select = $("res");
  select.textContent = "";
  option(select, "auto", "auto (follows the zoom)", state.mode === "auto");
  const counts = info[state.model].resolutions;
  for (const { res, source } of levels) {
    const what = source === "held" ? `${Number(counts[res].cells).toLocaleString()} cells` : source;
    option(select, res, `${res} (${what})`, state.mode === res);
  }
}

// A cell's outline as [lng, lat] vertices, unwrapped so that no edge jumps 360 degrees (as the
// PNG of query/mapping.py draws cells); a cell round a pole is closed along the map's top or
// bottom edge. A ring may then run past +-180.
function cellRing(boundary) {
  const ring = boundary.map(([lat, lng]) => [lng, lat]);
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
// Mercator cannot show the poles). Most cells cross neither: their outline is used as it is.
function cellPolygons(cell) {
  const boundary = h3.cellToBoundary(cell);
  let lo = 180;
  let hi = -180;
  let top = 0;
  for (const [lat, lng] of boundary) {
    if (lng < lo) lo = lng;
    if (lng > hi) hi = lng;
    if (Math.abs(lat) > top) top = Math.abs(lat);
  }
  if (hi - lo < 180 && top < MERCATOR_LAT) return [boundary.map(([lat, lng]) => [lng, lat])];
  const ring = cellRing(boundary);
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
  const layers = cellsLayer ? [cellsLayer] : [];
  if (land && state.firstPaint !== null) { // after the cells: their first frame compiles fewer shaders
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

// ------------------------------------------------------------------------------ the view asked for
function wrap(lon) {
  return ((((lon + 180) % 360) + 360) % 360) - 180;
}

// The view's box, widened by PAD each side, as the server takes it: lon in -180..180 (west > east
// across the antimeridian; the whole range once the view spans most of the globe), lat in -90..90
// (to the pole once the view nears the map's edge). And the budget of cells for its pixels.
// The view as it is now (deck.gl's own viewports exist only once it has drawn a frame).
function currentViewport() {
  return new deck.WebMercatorViewport({ ...viewState, width: $("map").clientWidth, height: $("map").clientHeight });
}

function viewRequest() {
  const viewport = currentViewport();
  const [w0, s0, e0, n0] = viewport.getBounds();
  const dx = (e0 - w0) * PAD;
  const dy = (n0 - s0) * PAD;
  let west = w0 - dx;
  let east = e0 + dx;
  const south = s0 - dy < -80 ? -90 : Math.max(-90, s0 - dy);
  const north = n0 + dy > 80 ? 90 : Math.min(90, n0 + dy);
  if (east - west >= 300) {
    west = -180;
    east = 180;
  } else {
    west = wrap(west);
    east = wrap(east);
    if (west === east) east = west + 1e-9;
  }
  const area = viewport.width * viewport.height * (1 + 2 * PAD) ** 2;
  const budget = Math.max(MIN_BUDGET, Math.min(300000, Math.round(area / PIXELS_PER_CELL)));
  const round = (v) => Math.round(v * 1e4) / 1e4;
  return { bbox: [round(west), round(south), round(east), round(north)], budget, zoom: viewport.zoom,
           maxRes: finestShown(viewport) };
}

// The finest level whose cells are at least MIN_CELL_PX wide at the view's centre (a cell is
// about two edges across).
function finestShown(viewport) {
  const lat = Math.min(80, Math.abs(viewport.latitude));
  const pxPerKm = (512 * 2 ** viewport.zoom) / (40075 * Math.cos((lat * Math.PI) / 180));
  for (let r = 15; r > 0; r--) {
    if (2 * (EDGE_KM_RES0 / 7 ** (r / 2)) * pxPerKm >= MIN_CELL_PX) return r;
  }
  return 0;
}

function contains(outer, inner) {
  const [w, s, e, n] = outer;
  if (inner[1] < s || inner[3] > n) return false;
  if (w === -180 && e === 180) return true;
  const within = (lon) => (w <= e ? lon >= w && lon <= e : lon >= w || lon <= e);
  const span = (x0, x1) => (x0 <= x1 ? x1 - x0 : x1 + 360 - x0);
  return within(inner[0]) && within(inner[2]) && span(w, inner[0]) <= span(w, inner[2]) && span(inner[0], inner[2]) <= span(w, e);
}

function visibleBox() {
  const [w, s, e, n] = currentViewport().getBounds();
  if (e - w >= 360) return [-180, Math.max(-90, s), 180, Math.min(90, n)];
  return [wrap(w), Math.max(-90, s), wrap(e), Math.min(90, n)];
}

function scheduleView(delay = DEBOUNCE_MS) {
  clearTimeout(timer);
  timer = setTimeout(() => requestView().catch(fail), delay);
}

async function requestView(force = false) {
  if (!info) return; // a view change while the atlas is still described: main() asks once it is
  keepAddress();
  const want = viewRequest();
  const key = `${state.model}|${state.mode}`;
  // the drawn layer still covers the view, at about this zoom: nothing to ask
  const covers = (had) => had && had.key === key && Math.abs(had.zoom - want.zoom) < 0.5
    && contains(had.bbox, visibleBox());
  if (!force && (covers(fetched) || covers(pending))) return; // drawn, or on its way
  if (pending) pending.controller.abort();
  const mine = { controller: new AbortController(), seq: ++seq, key, bbox: want.bbox, zoom: want.zoom };
  pending = mine;
  state.status = cellsLayer ? "updating" : "loading";
  state.timing = { asked: performance.now() };
  const params = new URLSearchParams({ model: state.model, bbox: want.bbox.join(","), max_cells: want.budget });
  if (state.mode !== "auto") params.set("res", state.mode);
  else params.set("max_res", want.maxRes);
  setStatus(cellsLayer ? `${statusText()} · updating…` : "loading…");
  let data;
  try {
    state.requests += 1;
    data = await getJSON(`v1/map?${params}`, mine.controller.signal);
  } catch (err) {
    if (err.name === "AbortError") return;
    if (pending === mine) pending = null;
    throw err;
  }
  if (pending !== mine) return; // a newer view was asked for meanwhile
  pending = null;
  state.bytes = lastBytes;
  state.timing.answered = performance.now();
  showLayer(data, want, key);
}

function showLayer(data, want, key) {
  const rows = [];
  for (let i = 0; i < data.cells.length; i++) {
    const cell = data.cells[i];
    const color = [data.colors[3 * i], data.colors[3 * i + 1], data.colors[3 * i + 2]];
    for (const polygon of cellPolygons(cell)) rows.push({ cell, color, polygon });
  }
  // Polygons cut here (cellPolygons) rather than deck.gl's H3HexagonLayer, which leaves cells on
  // the antimeridian and round the poles to the map's world copies, drawn only where those are.
  cellsLayer = new deck.PolygonLayer({
    id: `cells-${data.model}-${seq}`, data: rows, getPolygon: (d) => d.polygon, getFillColor: (d) => d.color,
    filled: true, stroked: false, extruded: false, pickable: true,
  });
  drawnPolygons = rows.map((r) => r.polygon);
  state.timing.built = performance.now();
  fetched = { bbox: data.bbox, zoom: want.zoom, key };
  Object.assign(state, { res: data.res, source: data.source, fromRes: data.from_res, cells: data.cells.length });
  fillLevels(data.levels);
  showLegend(data);
  painted = false;
  render();
  setStatus(statusText());
}

function statusText() {
  if (state.res === null) return "";
  const how = SOURCE_TEXT[state.source](state.fromRes);
  return `resolution ${state.res} (${how}) · ${state.cells.toLocaleString()} cells`;
}

function showLegend(data) {
  const legend = $("legend");
  legend.textContent = "";
  const head = document.createElement("p");
  head.textContent = `${info[data.model].model}: colour = principal components 1, 2, 3 of the embeddings as red, `
    + "green, blue, one basis for the whole dataset (the same colours at every zoom). Click a place.";
  legend.appendChild(head);
  ["red", "green", "blue"].forEach((name, i) => {
    const row = document.createElement("div");
    row.className = "swatch";
    const chip = document.createElement("span");
    chip.style.background = `linear-gradient(to right, rgb(0,0,0), ${["rgb(255,0,0)", "rgb(0,255,0)", "rgb(0,0,255)"][i]})`;
    row.appendChild(chip);
    const share = data.explained_variance[i];
    row.appendChild(document.createTextNode(share < 1e-6
      ? ` ${name}: unused (the embeddings vary in fewer than ${i + 1} directions)`
      : ` ${name}: component ${i + 1}, ${(100 * share).toFixed(1)}% of the variance (low to high)`));
    legend.appendChild(row);
  });
}

// ------------------------------------------------------------------------------ similar places
function heldLevels() {
  return state.levels.filter((l) => l.source === "held").map((l) => l.res);
}

// The resolution a search runs at: the one shown when the atlas holds it, else the nearest held
// one (coarser first).
function searchRes() {
  const held = heldLevels();
  if (held.includes(state.res)) return state.res;
  const coarser = held.filter((r) => r < state.res);
  return coarser.length ? Math.max(...coarser) : Math.min(...held);
}

async function showSimilar(query, label) {
  state.status = "searching";
  setStatus(`searching places like ${label}…`);
  const params = new URLSearchParams({ model: state.model, res: searchRes(), k: 10, ...query });
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
  $("similar-title").textContent = `Most similar to ${label} (resolution ${params.get("res")})`;
  render();
  state.status = "ready";
  setStatus(statusText());
}

function clearSimilar() {
  state.selected = null;
  state.similar = [];
  $("similar").textContent = "";
  $("similar-title").hidden = true;
}

function onClick(picked) {
  let query;
  let label;
  if (picked.object && heldLevels().includes(state.res)) {
    query = { cell: picked.object.cell };
    label = `cell ${picked.object.cell}`;
  } else if (picked.coordinate) { // an overview cell, or no cell (open ocean in a land-only atlas): the point
    const lon = wrap(picked.coordinate[0]);
    const lat = Math.max(-90, Math.min(90, picked.coordinate[1]));
    query = { lat, lon };
    label = `${lat.toFixed(2)}, ${lon.toFixed(2)}`;
  } else {
    return;
  }
  showSimilar(query, label).catch(fail);
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

function onHover({ object, coordinate }) {
  if (!coordinate) {
    $("cursor").textContent = "";
    return;
  }
  const where = `${coordinate[1].toFixed(3)}, ${wrap(coordinate[0]).toFixed(3)}`;
  $("cursor").textContent = object ? `${where} · cell ${object.cell} (resolution ${state.res})` : where;
}

// Screen position of a place, for scripts driving the page (the browser test clicks with it).
window.hexatlasProject = (lon, lat) => currentViewport().project([lon, lat]);

function setView(next) {
  viewState = { ...viewState, ...next };
  deckgl.setProps({ viewState });
}

// The view into the address, once it settles (browsers throttle a replaceState every frame).
function keepAddress() {
  const { zoom, latitude, longitude } = viewState;
  history.replaceState(null, "", `#map=${zoom.toFixed(2)}/${latitude.toFixed(4)}/${wrap(longitude).toFixed(4)}`);
}

// A view in the address (#map=ZOOM/LAT/LON, as OpenStreetMap writes it): a link opens on that view.
function viewFromAddress() {
  const match = /^#map=(-?[\d.]+)\/(-?[\d.]+)\/(-?[\d.]+)$/.exec(window.location.hash);
  if (!match) return null;
  const [zoom, latitude, longitude] = match.slice(1).map(Number);
  if (![zoom, latitude, longitude].every(Number.isFinite)) return null;
  return { ...viewState, zoom: Math.max(0, Math.min(17, zoom)), latitude: Math.max(-85, Math.min(85, latitude)),
           longitude: wrap(longitude) };
}

window.hexatlasGoTo = (longitude, latitude, zoom) => {
  setView({ longitude, latitude, zoom });
  scheduleView(0);
};

// A regional atlas opens on its region; a global one on the globe.
function initialView() {
  const region = info[state.model].region;
  if (!region || !region.bbox) return viewState;
  let [w, s, e, n] = region.bbox;
  if (w > e) e += 360;
  const fitted = new deck.WebMercatorViewport({ width: $("map").clientWidth, height: $("map").clientHeight })
    .fitBounds([[w, s], [e, n]], { padding: 40 });
  return { ...viewState, longitude: wrap(fitted.longitude), latitude: fitted.latitude, zoom: fitted.zoom };
}

async function main() {
  // WebGL starts while the atlas is described: the first view is asked for as soon as it is known
  const described = getJSON("v1/info");
  const address = viewFromAddress();
  if (address) viewState = address;
  deckgl = new deck.Deck({
    parent: $("map"),
    views: new deck.MapView({ repeat: true }),
    viewState,
    controller: { minZoom: 0, maxZoom: 17 },
    onViewStateChange: ({ viewState: next }) => {
      setView(next);
      scheduleView();
    },
    layers: [],
    onHover,
    onAfterRender: () => {
      if (cellsLayer && !painted && cellsLayer.isLoaded) {
        painted = true;
        state.paintedAt = performance.now();
        state.timing.painted = state.paintedAt;
        if (state.firstPaint === null) {
          state.firstPaint = state.paintedAt;
          setTimeout(render, 0); // now the land outlines
        }
        if (state.status !== "searching") state.status = pending ? "updating" : "ready";
      }
    },
    getTooltip: ({ object }) => object && `${object.cell}\nresolution ${state.res}`,
  });
  info = await described;
  const models = Object.keys(info);
  state.model = models[0];
  for (const m of models) option($("model"), m, `${m} (${info[m].dim}-d)`, m === state.model);
  option($("res"), "auto", "auto (follows the zoom)", true);
  if (!address) setView(initialView());
  const first = requestView(true);
  listenForClicks($("map"));
  window.addEventListener("hashchange", () => { // an address typed or pasted: go there
    const typed = viewFromAddress();
    if (typed) {
      setView(typed);
      scheduleView(0);
    }
  });
  $("model").onchange = (e) => {
    state.model = e.target.value;
    state.mode = "auto";
    state.levels = [];
    clearSimilar();
    requestView(true).catch(fail);
  };
  $("res").onchange = (e) => {
    state.mode = e.target.value === "auto" ? "auto" : Number(e.target.value);
    clearSimilar();
    requestView(true).catch(fail);
  };
  const outlines = getJSON("static/land-110m.json").then((topology) => {
    land = topojson.feature(topology, topology.objects.land);
    render();
  }).catch(() => { land = null; }); // outlines are a nicety; the cells carry the map
  await first;
  await outlines;
}

main().catch(fail);
