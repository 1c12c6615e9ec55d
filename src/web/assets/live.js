// saltpipe web, the Live page: kept events from /live/events (server-sent
// events), newest first. Everything is set as text, never as HTML.
(function () {
  "use strict";
  var rows = document.getElementById("live-rows");
  var table = document.getElementById("live-table");
  var status = document.getElementById("live-status");
  var button = document.getElementById("live-pause");
  if (!rows || !table || !status || !button) { return; }
  var max = parseInt(table.getAttribute("data-max-rows"), 10) || 500;
  var paused = false;
  var held = [];
  var shown = 0;
  var skipped = 0;

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    if (cls) {
      var span = document.createElement("span");
      span.className = cls;
      span.textContent = text;
      td.appendChild(span);
    } else {
      td.textContent = text;
    }
    tr.appendChild(td);
  }

  function jobHref(e) {
    var h = "/job/" + encodeURIComponent(e.jid);
    return e.minion ? h + "?minion=" + encodeURIComponent(e.minion) : h;
  }

  function show(e) {
    var tr = document.createElement("tr");
    tr.className = "live-row";
    cell(tr, e.time.replace("T", " ").replace("Z", ""));
    var td = document.createElement("td");
    if (e.jid && /^[0-9]{20}$/.test(e.jid)) {
      var a = document.createElement("a");
      a.href = jobHref(e);
      a.textContent = e.tag;
      td.appendChild(a);
    } else {
      td.textContent = e.tag;
    }
    tr.appendChild(td);
    cell(tr, e.minion);
    cell(tr, e.fun);
    if (e.outcome) { cell(tr, e.outcome, "pill o-" + e.outcome.replace(/[^a-z_]/g, "")); } else { cell(tr, ""); }
    rows.insertBefore(tr, rows.firstChild);
    while (rows.childNodes.length > max) { rows.removeChild(rows.lastChild); }
    shown += 1;
  }

  function say() {
    var s = paused ? "Paused, " + held.length + " new held" : "Live, " + shown + " events";
    if (skipped > 0) { s += " (" + skipped + " skipped: this page fell behind)"; }
    status.textContent = s;
  }

  button.addEventListener("click", function () {
    paused = !paused;
    button.setAttribute("aria-pressed", paused ? "true" : "false");
    button.textContent = paused ? "Resume" : "Pause";
    if (!paused) {
      held.forEach(show);
      held = [];
    }
    say();
  });

  var source = new EventSource("/live/events");
  source.addEventListener("open", function () { say(); });
  source.addEventListener("error", function () { status.textContent = "Disconnected, retrying…"; });
  source.addEventListener("lagged", function (m) { skipped += parseInt(m.data, 10) || 0; say(); });
  source.addEventListener("message", function (m) {
    var e;
    try { e = JSON.parse(m.data); } catch (err) { return; }
    if (paused) {
      held.push(e);
      if (held.length > max) { held.shift(); }
    } else {
      show(e);
    }
    say();
  });
}());
