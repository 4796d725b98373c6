"""Edge export: a specialist's champion parts as one folder that answers offline, with no stack.

- `bundle`: what a bundle holds (`bundle.json`, its format, checksums), `export_bundle` (local parts → folder) and
  `verify_bundle` (refuses a bundle with a missing, changed or unknown part, naming the file).
- `runner`: `Bundle.open(dir).answer({...})`: llama.cpp in process, LanceDB and the embedding model from the folder,
  the serving prompt and answer rule of `cadre serve` (no MLflow, no Prefect, no server).
- `export`: the champion parts of a specialist as the registry names them, as `cadre serve` reads them.

Run: `cadre export -s SPECIALIST --to DIR`, then `cadre answer --bundle DIR "text"`.
"""

from cadre.edge.bundle import BUNDLE_FORMAT, BundleError, BundleParts, export_bundle, verify_bundle
from cadre.edge.runner import Bundle

__all__ = ["BUNDLE_FORMAT", "Bundle", "BundleError", "BundleParts", "export_bundle", "verify_bundle"]
