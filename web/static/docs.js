// The API reference at /api/docs: Swagger UI (shipped in vendor/) over the
// generated document. A script of its own, since the page runs nothing inline.
"use strict";
(function () {
  var root = document.getElementById("api-reference");
  window.SwaggerUIBundle({
    url: root.dataset.document,
    domNode: root,
    deepLinking: true,
  });
})();
