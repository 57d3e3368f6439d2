"""Reports: run metrics, plots and the HTML/Markdown renderer."""
