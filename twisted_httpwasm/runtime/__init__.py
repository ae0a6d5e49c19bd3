"""The wasm runtime: engine, compiled guests, instance pools, host functions. No twisted.web."""
