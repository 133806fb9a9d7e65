"""The language-model graph the default pipeline decodes with, for the benchmarks that decode.

``results/<run>/lm/<decode_order>gram`` of config/config.yaml (the 3-gram over the whole
lexicon), built by the pipeline's own Snakemake stages when absent. benchmarks/server.py and
benchmarks/ensemble.py import it (a script's own directory is on ``sys.path``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "config.yaml"


def pipeline_graph() -> Path:
    """The graph the default pipeline decodes with, built by its own stages when absent."""
    from b2txt.ground.config import load_config

    cfg = load_config(CONFIG)
    lm = ROOT / f"results/{cfg.run}/lm/{cfg.lm.decode_order}gram"
    if not (lm / "TLG.fst").is_file():
        target = str((lm / "TLG.fst").relative_to(ROOT))
        print(f"building the pipeline's graph: snakemake --cores all {target} (a few minutes, once)", flush=True)
        subprocess.run(["snakemake", "--cores", "all", target], cwd=ROOT, check=True)
    return lm


def describe(lm: Path) -> str:
    """The graph directory, its vocabulary size and (when graph.json says) its TLG arcs."""
    info = lm / "graph.json"
    words = sum(1 for _ in open(lm / "words.txt"))
    stats = json.loads(info.read_text()) if info.is_file() else {}
    arcs = f", {stats['tlg_arcs']:,} TLG arcs" if "tlg_arcs" in stats else ""
    return f"{lm} ({words:,} words{arcs})"
