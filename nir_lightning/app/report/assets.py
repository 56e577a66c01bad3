"""The page's CSS and script, inlined into every report (no CDN, works offline).

The script sorts (click a header; again to reverse; empty cells last), filters (text, status,
flagged only), opens a pair's QC figure on click and scrolls to a pair from a plot mark. It
reads the values from ``data-v`` attributes that Python wrote, so it renders nothing itself:
the page is complete without it. Opened with ``#selftest``, it exercises itself and writes the
results as JSON into ``<pre id="selftest">`` (read by the browser test through ``--dump-dom``).
"""

from __future__ import annotations

CSS = """
body{font:13px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:0 24px 40px;color:#222}
h1{font-size:20px;margin:18px 0 4px}h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #ddd}
.muted{color:#666}.warn{background:#fff4d6;border-left:4px solid #e6a700;padding:6px 10px;margin:6px 0}
table.stats td,table.stats th{padding:2px 10px;text-align:right}table.stats th:first-child,table.stats td:first-child{text-align:left}
.counts span{display:inline-block;margin-right:18px;font-size:15px}
.counts b{font-size:20px}
ol#flags{padding-left:22px}ol#flags li{margin:6px 0}ol#flags ul{margin:2px 0;padding-left:18px}
.sev{display:inline-block;min-width:26px;text-align:center;border-radius:9px;padding:0 5px;color:#fff;background:#999;font-size:11px}
.s100,.s90,.s88,.s86,.s80{background:#c62828}.s70,.s60,.s55{background:#ef6c00}.s50,.s48,.s45{background:#f9a825}
.s30,.s20,.s15,.s12,.s10{background:#7986cb}.s0{background:#ccc}
.plots{display:flex;flex-wrap:wrap;gap:18px}.plots figure{margin:0}.plots figcaption{font-weight:600}
svg .mark{cursor:pointer}
#controls{margin:6px 0 8px}#controls input[type=search]{width:260px}
table#pairs{border-collapse:collapse;width:100%}
#pairs th{position:sticky;top:0;background:#f4f4f4;cursor:pointer;user-select:none;padding:4px 6px;text-align:left;white-space:nowrap}
#pairs th.asc:after{content:" \\25B2"}#pairs th.desc:after{content:" \\25BC"}
#pairs td{padding:3px 6px;border-top:1px solid #eee;vertical-align:top}#pairs td.n{text-align:right;font-variant-numeric:tabular-nums}
#pairs tr.failed{background:#fdecea}#pairs tr.pending{background:#f2f2f2;color:#777;font-style:italic}
#pairs tr.hl{outline:3px solid #1f77b4}
#pairs td.flags{max-width:320px;font-size:12px}#pairs td.in{max-width:220px;overflow-wrap:anywhere;font-size:12px}
img.thumb{height:56px;cursor:zoom-in;display:block}
#modal{position:fixed;inset:0;background:rgba(0,0,0,.75);display:flex;align-items:center;justify-content:center;flex-direction:column;z-index:9}
#modal[hidden]{display:none}#modal img{max-width:95vw;max-height:88vh;background:#fff}#modal a{color:#fff;margin-top:6px}
"""

JS = r"""
(function () {
  "use strict";
  var t0 = performance.now();
  var table = document.getElementById("pairs"), tbody = table.tBodies[0];
  var rows = Array.prototype.slice.call(tbody.rows);
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var text = rows.map(function (r) { return r.textContent.toLowerCase(); });
  var state = {col: -1, dir: 1};

  function key(r, i) {
    var c = r.cells[i], v = c.getAttribute("data-v");
    if (v === null) v = c.textContent;
    if (heads[i].getAttribute("data-t") === "num") { var x = parseFloat(v); return isNaN(x) ? null : x; }
    return v === "" ? null : v.toLowerCase();
  }
  function sortBy(i, dir) {
    if (dir === undefined) dir = state.col === i ? -state.dir : (heads[i].getAttribute("data-first") === "desc" ? -1 : 1);
    var keyed = rows.map(function (r, n) { return [key(r, i), n, r]; });
    keyed.sort(function (a, b) {
      if (a[0] === null || b[0] === null) return a[0] === null ? (b[0] === null ? a[1] - b[1] : 1) : -1;
      if (a[0] < b[0]) return -dir; if (a[0] > b[0]) return dir; return a[1] - b[1];
    });
    var frag = document.createDocumentFragment();
    keyed.forEach(function (k) { frag.appendChild(k[2]); });
    tbody.appendChild(frag);
    rows = keyed.map(function (k) { return k[2]; });
    text = rows.map(function (r) { return r.textContent.toLowerCase(); });
    heads.forEach(function (h) { h.classList.remove("asc", "desc"); });
    heads[i].classList.add(dir > 0 ? "asc" : "desc");
    state = {col: i, dir: dir};
  }
  heads.forEach(function (h, i) { h.addEventListener("click", function () { sortBy(i); }); });

  var q = document.getElementById("filter"), st = document.getElementById("status"), fl = document.getElementById("flagged");
  var shown = document.getElementById("shown");
  function applyFilter() {
    var words = q.value.toLowerCase().split(/\s+/).filter(Boolean), s = st.value, f = fl.checked, n = 0;
    rows.forEach(function (r, k) {
      var ok = (!s || r.getAttribute("data-status") === s) && (!f || r.getAttribute("data-sev") !== "0") &&
        words.every(function (w) { return text[k].indexOf(w) >= 0; });
      r.hidden = !ok; if (ok) n++;
    });
    shown.textContent = n + " of " + rows.length + " pairs shown";
  }
  [q, st, fl].forEach(function (el) { el.addEventListener("input", applyFilter); el.addEventListener("change", applyFilter); });

  var modal = document.getElementById("modal"), big = modal.querySelector("img"), link = modal.querySelector("a");
  function openQC(src, href, id) { big.src = src; link.href = href; link.textContent = id + ": open the folder"; modal.hidden = false; }
  tbody.addEventListener("click", function (e) {
    var img = e.target.closest ? e.target.closest("img.thumb") : null;
    if (img) { e.preventDefault(); openQC(img.getAttribute("src"), img.getAttribute("data-folder"), img.getAttribute("data-id")); }
  });
  modal.addEventListener("click", function (e) { if (e.target !== link) modal.hidden = true; });
  document.addEventListener("keydown", function (e) { if (e.key === "Escape") modal.hidden = true; });

  function goTo(id) {
    var r = rows.filter(function (x) { return x.getAttribute("data-id") === id; })[0];
    if (!r) return;
    r.hidden = false; r.scrollIntoView({block: "center"});
    rows.forEach(function (x) { x.classList.remove("hl"); }); r.classList.add("hl");
  }
  document.addEventListener("click", function (e) {
    var m = e.target.closest ? e.target.closest("[data-id].mark, a.goto") : null;
    if (m) { e.preventDefault(); goTo(m.getAttribute("data-id")); }
  });
  applyFilter();
  var initMs = performance.now() - t0;

  if (location.hash === "#selftest") {
    var out = {rows: rows.length, flags: document.querySelectorAll("#flags > li").length,
               plots: document.querySelectorAll("svg.plot").length, marks: document.querySelectorAll("svg .mark").length,
               init_ms: initMs, ready_ms: performance.now()};
    var col = heads.map(function (h) { return h.getAttribute("data-k"); }).indexOf("dice_after");
    function ordered(d) {
      var v = rows.map(function (r) { return key(r, col); }).filter(function (x) { return x !== null; });
      for (var k = 1; k < v.length; k++) if ((v[k] - v[k - 1]) * d < 0) return false;
      return v.length > 1;
    }
    var s0 = performance.now(); heads[col].click(); out.sort_ms = performance.now() - s0;
    out.sorted_asc = ordered(1) && heads[col].classList.contains("asc");
    heads[col].click(); out.sorted_desc = ordered(-1) && heads[col].classList.contains("desc");
    out.first_after_desc = rows[0].getAttribute("data-id");
    var sev = heads.map(function (h) { return h.getAttribute("data-k"); }).indexOf("severity");
    sortBy(sev, -1);
    out.first_ids = rows.slice(0, 5).map(function (r) { return r.getAttribute("data-id"); });
    fl.checked = true; applyFilter(); out.flagged_shown = rows.filter(function (r) { return !r.hidden; }).length;
    fl.checked = false; applyFilter();
    var img = tbody.querySelector("img.thumb");
    if (img) { img.click(); out.modal_opens = !modal.hidden && big.getAttribute("src") === img.getAttribute("src"); modal.click(); }
    document.getElementById("selftest").textContent = JSON.stringify(out);
  }
})();
"""
