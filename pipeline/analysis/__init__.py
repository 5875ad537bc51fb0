"""The source papers' analyses: each a function of (model, data, patch or attack) returning arrays and a figure."""
