// MathJax 2 settings for pymdownx.arithmatex (generic mode): typeset only the \( \) and \[ \] spans it marks.
window.MathJax = {
  tex2jax: {inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true,
            processEnvironments: true, ignoreClass: ".*|", processClass: "arithmatex"},
  showMathMenu: false,
};
