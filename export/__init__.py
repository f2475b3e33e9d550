"""Export: models to ONNX and TensorRT-friendly variants, each with a parity and speed report.

`nearvoice export from-transformers` turns a local transformers VITS checkpoint into ONNX;
`nearvoice export optimize` turns any supported ONNX TTS model into variants (fp32, fp32-opt,
fp16, int8), measures them and writes `manifest.json`, `report.md` and `report.png`. Engines
read the manifest (`edge.synth.exported`) and run the fastest variant that passes parity.

Needs the `export` extra (onnx, torch, transformers, matplotlib); the edge install has none.
"""
