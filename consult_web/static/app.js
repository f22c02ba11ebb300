// Live updates for every page: one EventSource on /events. Each change is
// re-dispatched on window as CustomEvent('xrt:changed', {detail: {kind, study_uid}})
// so the page's own script (worklist.js, study.js, viewer.js) decides what to re-fetch.
(function () {
  "use strict";
  var status = document.getElementById("live-status");
  function setState(state) {
    document.body.dataset.live = state; // "live" once the stream is open (tests wait for it)
    if (!status) return;
    status.dataset.state = state;
    var text = status.dataset["label" + state.charAt(0).toUpperCase() + state.slice(1)];
    if (text) status.textContent = text;
  }
  if (!document.querySelector("meta[name=csrf-token]") || !document.querySelector("meta[name=csrf-token]").content) {
    return; // not logged in: no stream
  }
  if (!window.EventSource) return;
  var source = new EventSource("/events");
  source.addEventListener("open", function () { setState("live"); });
  source.addEventListener("error", function () { setState("offline"); });
  source.addEventListener("change", function (event) {
    var detail;
    try { detail = JSON.parse(event.data); } catch (e) { return; }
    window.dispatchEvent(new CustomEvent("xrt:changed", { detail: detail }));
  });
})();

(function () {
  "use strict";
  // A select the user changed from the option the page was served with.
  function chosen(select) {
    for (var i = 0; i < select.options.length; i++) {
      if (select.options[i].defaultSelected) return select.value !== select.options[i].value;
    }
    return select.selectedIndex > 0;
  }

  function hasOption(select, value) {
    for (var i = 0; i < select.options.length; i++) {
      if (select.options[i].value === value) return true;
    }
    return false;
  }

  // Shared helpers for page scripts.
  window.xrt = {
    csrf: function () {
      var meta = document.querySelector("meta[name=csrf-token]");
      return meta ? meta.content : "";
    },
    // Replace an element's content with server-rendered HTML from its data-src, keeping what
    // the user was typing in text fields and the choice they made in a select (matched by id):
    // a live refresh that lands between choosing a conclusion and pressing "Send" must not
    // quietly put the select back to its default.
    refresh: function (element) {
      if (!element || !element.dataset.src) return Promise.resolve();
      // Refreshes can overlap (a change arrives while the last one is in flight): only the newest
      // one's answer is shown, so a slow older answer never puts stale rows back.
      var seq = (element.xrtRefreshSeq = (element.xrtRefreshSeq || 0) + 1);
      return fetch(element.dataset.src, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (response) {
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.text();
        })
        .then(function (html) {
          if (seq !== element.xrtRefreshSeq) return;  // a newer refresh was started: its answer wins
          var kept = {};
          var focused = document.activeElement && document.activeElement.id;
          element.querySelectorAll("textarea[id], input[type=text][id], select[id]").forEach(function (field) {
            if (field.tagName === "SELECT") {
              if (chosen(field)) kept[field.id] = field.value;
            } else if (field.value) {
              kept[field.id] = field.value;
            }
          });
          element.innerHTML = html;
          Object.keys(kept).forEach(function (id) {
            var field = document.getElementById(id);
            if (!field) return;
            if (field.tagName === "SELECT" && !hasOption(field, kept[id])) return; // no longer offered
            field.value = kept[id];
          });
          if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
        })
        .catch(function () { /* keep what is shown; the next change retries */ });
    }
  };
})();
