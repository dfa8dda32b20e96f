// ipywidgets' embed manager typesets widget labels with MathJax 2's MathJax.Hub.Queue; the book loads MathJax 3.
(function () {
  var config = window.MathJax = window.MathJax || {};
  if (config.version) return;
  config.startup = config.startup || {};
  config.startup.ready = function () {
    MathJax.startup.defaultReady();
    MathJax.Hub = { Queue: function (job) {
      var el = job && job[2];
      if (el) MathJax.startup.promise = MathJax.startup.promise.then(function () { return MathJax.typesetPromise([el]); });
    } };
  };
})();
