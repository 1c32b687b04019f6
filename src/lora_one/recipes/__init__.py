"""The applications built on the library: data and models (`data`, `embedded_data`, `models`), the
`init`/`eval` runs (`runs`, `settings`, `load`, `evaluate`, `probe`), fine-tuning on `transformers.Trainer`
(`finetune`), `compare` and `demo`, `merge`, `hub`, `plots` and the `toys`. They need the `cli` extra's
packages (datasets, gguf, matplotlib, pyyaml) and import `core` and `linalg`, never the `cli`."""
