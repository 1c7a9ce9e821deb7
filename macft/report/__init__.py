"""The HTML report of a run: curves (plots.py) and the page (page.py). Reads the run folder
and eval results; imports runs/ and inference/scoring.py."""
