"""The `int8` variant: each model gets the fastest 8-bit recipe that stays faithful on it.

- `recipes`: the recipes (`RECIPES`, fastest first) and how precise one is against another;
- `tensors`: one fp32 weight as a recipe's int8 initializers (per tensor, nothing else needed);
- `rewrite`: an fp32 graph rewritten with a recipe, written one weight at a time;
- `calibrate`: the fp32 model (`Fp32Model`: an exported graph, or the traced graph with the
  checkpoint's weights) run over the calibration texts: reference embeddings, start states and
  the per-channel statistics of the outlier recipes;
- `select`: the choice (`choose`, what the exporter calls) and `add_int8`, which rebuilds a
  package's int8 variant (`python -m export.int8 --model DIR --add-to PKG [--recipes ...]`).

Measuring every recipe's fidelity and speed on one model is a benchmark, tests/bench/int8_recipes.py.
"""
