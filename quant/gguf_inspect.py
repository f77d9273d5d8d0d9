"""Print a GGUF's tensor table as one JSON line. Run as a script with the vendored gguf-py on
PYTHONPATH (quant.gguf.inspect does): the reader must know the ggml types of the llama.cpp version
that wrote the file, which a separately installed `gguf` package may not."""

import json
import sys

from gguf import GGUFReader


def main(path: str) -> None:
    reader = GGUFReader(path)
    print(json.dumps({t.name: {"type": t.tensor_type.name, "shape": [int(s) for s in t.shape],
                               "elements": int(t.n_elements), "bytes": int(t.n_bytes)}
                      for t in reader.tensors}))


if __name__ == "__main__":
    main(sys.argv[1])
