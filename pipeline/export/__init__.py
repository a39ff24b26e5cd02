"""Stage export (and targets): merged model, adapter, ONNX, FAISS index, MLflow model, search engines."""
