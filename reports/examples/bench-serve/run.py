"""The serve part of the bench on its own, as run for serve.json/serve.md here (from the repository root,
`HF_HUB_OFFLINE=1 .venv/bin/python reports/examples/bench-serve/run.py`); `make bench` runs the same part."""
import json, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
from pipeline.core.config import load_config
from pipeline import bench_serve
cfg = load_config("configs/default.yaml", ["bench.serve_requests=150"])
texts = ["samsung galaxy s21 5g 128gb black", "lg 55 inch oled tv 4k", "bosch serie 4 fridge freezer", "intel core i7 12700k cpu",
         "apple iphone 13 pro max 256gb", "sony bravia xr 65 inch", "amd ryzen 9 5900x processor", "smeg retro fridge cream"]
t = time.time()
serve = bench_serve.run(cfg, Path("cache/bench-serve"), texts)
serve["seconds"] = round(time.time() - t, 1)
Path("reports/bench").mkdir(parents=True, exist_ok=True)
Path("reports/bench/serve.json").write_text(json.dumps(serve, indent=1))
Path("reports/bench/serve.md").write_text(bench_serve.markdown(serve))
import shutil
shutil.rmtree("cache/bench-serve", ignore_errors=True)  # 23 merged MiniLM copies
print("done")
