// A redirect step: go on to the identity provider without a click (the page also works
// without scripts: the link or button does the same).
(function () {
  var form = document.querySelector("form#redirect");
  if (form) { form.submit(); return; }
  var link = document.getElementById("continue");
  if (link) { window.location.replace(link.getAttribute("href")); }
})();
