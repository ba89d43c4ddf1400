"""The paper's Table 6 ablations as configs (``table6.py`` holds the rows)."""
