// Worklist: re-fetch the table body (same filters) whenever anything visible changes.
(function () {
  "use strict";
  var body = document.getElementById("worklist-rows");
  if (!body) return;
  var pending = null;
  window.addEventListener("xrt:changed", function () {
    if (pending) return;
    pending = setTimeout(function () { pending = null; window.xrt.refresh(body); }, 200);
  });
  // The study page's next/previous keys (static/viewer.js) walk the worklist in the order shown.
  function rememberOrder() {
    var uids = [];
    body.querySelectorAll('a[href^="/studies/"]').forEach(function (a) {
      var uid = decodeURIComponent(a.getAttribute("href").slice(9));
      if (uids.indexOf(uid) < 0) uids.push(uid);
    });
    try { sessionStorage.setItem("xrt.worklist", JSON.stringify(uids)); } catch (e) { /* storage off */ }
  }
  rememberOrder();
  body.addEventListener("click", rememberOrder, true);
  // Keep "time since arrival" honest even when nothing happens.
  setInterval(function () { window.xrt.refresh(body); }, 60000);
})();
