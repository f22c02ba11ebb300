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
  // Keep "time since arrival" honest even when nothing happens.
  setInterval(function () { window.xrt.refresh(body); }, 60000);
})();
