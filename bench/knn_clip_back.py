"""Does clip-retrieval's own back end serve the folder `pipeline.py index` writes? Answered with clip-retrieval's code.

`clip-retrieval back` cannot share an environment with this project: clip-retrieval 2.45 pins numpy<2, pyarrow<16,
torch, torchvision, open-clip-torch, sentence-transformers, wandb and img2dataset, and at start it loads its CLIP model
through all_clip, from the internet. So this script makes a throwaway environment (uv, from the package index) with
clip-retrieval installed without its model dependencies (torch only, which KnnService.compute_query imports), and drives the part of clip_back.py that reads an index
folder, exactly as `clip-retrieval back --enable_faiss_memory_mapping True --use_arrow True` does:
`load_index(<folder>/image.index, True)` (faiss.IO_FLAG_MMAP | IO_FLAG_READ_ONLY), `ArrowMetadataProvider(<folder>/
metadata)`, and `KnnService.query(embedding_input=...)` (search_and_reconstruct, deduplication, metadata by id). Its
answers are compared with our service's (components/laion_retrieval/index.py) for the same queries.

    python bench/knn_clip_back.py INDEX_FOLDER QUERIES.npy [--venv /tmp/clip-back-venv]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ["numpy==1.26.4", "faiss-cpu==1.13.2", "pyarrow==15.0.2", "pandas==2.2.3", "flask==3.1.0",
            "flask_restful==0.3.10", "flask_cors==4.0.2", "fire==0.5.0", "h5py==3.12.1", "tqdm", "prometheus-client",
            "pillow", "fsspec", "requests"]

DRIVE = r'''
import importlib.util, json, pathlib, sys, types
import numpy as np
# clip_retrieval/__init__.py imports every tool (inference: torch, webdataset, ...); clip_back.py itself needs none of
# them: load it as the package's module without running the package's __init__
import clip_retrieval_location
package = types.ModuleType("clip_retrieval")
package.__path__ = [clip_retrieval_location.PATH]
sys.modules["clip_retrieval"] = package
spec = importlib.util.spec_from_file_location("clip_retrieval.clip_back", clip_retrieval_location.PATH + "/clip_back.py")
clip_back = importlib.util.module_from_spec(spec)
sys.modules["clip_retrieval.clip_back"] = clip_back
spec.loader.exec_module(clip_back)
folder, queries = sys.argv[1], np.load(sys.argv[2])
index = clip_back.load_index(folder + "/image.index", True)
meta = clip_back.ArrowMetadataProvider(folder + "/metadata")
resource = clip_back.ClipResource(device="cpu", model=None, preprocess=None, tokenizer=None, model_txt_mclip=None,
    safety_model=None, violence_detector=None, metadata_provider=meta, image_index=index, text_index=None,
    ivf_old_to_new_mapping=None, columns_to_return=["url", "caption"], metadata_is_ordered_by_ivf=False,
    aesthetic_embeddings=None)
service = clip_back.KnnService(clip_resources={"own": resource})
out = []
for q in queries:
    q = q / np.linalg.norm(q)
    out.append(service.query(embedding_input=q.tolist(), modality="image", num_images=40, num_result_ids=40,
                             indice_name="own", deduplicate=False))
print(json.dumps({"faiss": __import__("faiss").__version__, "mmap_lists": type(__import__("faiss").downcast_InvertedLists(
    __import__("faiss").extract_index_ivf(index).invlists)).__name__, "answers": out}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index")
    parser.add_argument("queries")
    parser.add_argument("--venv", default="/tmp/clip-back-venv")
    args = parser.parse_args()
    uv = shutil.which("uv") or str(pathlib.Path.home() / ".local" / "bin" / "uv")
    venv = pathlib.Path(args.venv)
    if not (venv / "bin" / "python").exists():
        subprocess.run([uv, "venv", "--quiet", "--python", "python3.11", str(venv)], check=True)
        subprocess.run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), *PACKAGES], check=True)
        subprocess.run([uv, "pip", "install", "--quiet", "--no-deps", "--python", str(venv / "bin" / "python"),
                        "clip-retrieval==2.45.0"], check=True)
    python = str(venv / "bin" / "python")
    if subprocess.run([python, "-c", "import torch"], capture_output=True).returncode:
        # KnnService.compute_query imports torch whatever the query (its CPU wheel where a find-links folder has it)
        links = ["--find-links", os.environ["PIP_FIND_LINKS"]] if os.environ.get("PIP_FIND_LINKS") else []
        subprocess.run([uv, "pip", "install", "--quiet", "--python", python, *links, "torch"], check=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (pathlib.Path(site) / "clip_retrieval_location.py").write_text(f"PATH = {str(pathlib.Path(site) / 'clip_retrieval')!r}\n")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", DRIVE, args.index, args.queries],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"clip-retrieval's back end could not serve {args.index}:\n{done.stderr[-3000:]}")
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    sys.path.insert(0, str(REPO))
    import numpy as np

    from components.laion_retrieval.index import KnnIndex

    ours = KnnIndex(args.index)
    queries = np.load(args.queries)
    same_ids = same_urls = 0
    for q, answer in zip(queries, theirs["answers"]):
        mine = ours.search(q, 40)
        same_ids += [r["id"] for r in mine] == [r["id"] for r in answer]
        same_urls += [r["url"] for r in mine] == [r["url"] for r in answer]
    print(f"clip-retrieval 2.45.0 back end (faiss {theirs['faiss']}, inverted lists {theirs['mmap_lists']}): "
          f"{len(queries)} queries, same ids as our service for {same_ids}, same urls for {same_urls}")
    print("first answer:", json.dumps(theirs["answers"][0][:2]))


if __name__ == "__main__":
    main()
