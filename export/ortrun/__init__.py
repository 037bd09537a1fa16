"""ONNX Runtime runners for exported graphs (CPU), shared by the verification and the int8 selection.

- `batch`: the runtime's batch contract (right padding, positions, last-token pooling), numpy only;
- `session`: one whole graph in one session (`session`, `onnx_hidden`, prefix states);
- `segmented`: one graph run segment by segment (`SegmentedGraph`), one layer's weights at a time;
- `batched`: many rows, alone or in right-padded batches, whole (`embed_rows`) or segmented
  (`embed_segmented`).

Nothing here imports the exporter's other modules but `export.cpu` (session options).
"""
