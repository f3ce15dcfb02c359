"""The Colab notebooks run top to bottom, as written, on a CPU kernel (their tiny mode).

Each notebook is executed by nbclient in a fresh folder with the environment of this test
session (8 simulated CPU devices, the session's data folder), so a notebook that needs a file
its own cells do not make, or that calls an API that has changed, fails here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')

COLAB = Path(__file__).resolve().parent.parent / 'colab'
NOTEBOOKS = sorted(COLAB.glob('*.ipynb'))


def test_notebooks_are_committed_without_outputs():
  # Diff-friendly: outputs and execution counts are stripped before commit.
  assert NOTEBOOKS, f'no notebooks in {COLAB}'
  for path in NOTEBOOKS:
    nb = json.loads(path.read_text())
    for cell in nb['cells']:
      if cell['cell_type'] == 'code':
        assert not cell.get('outputs') and cell.get('execution_count') is None, path.name


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch, compilation_cache):
  work = tmp_path / 'colab'
  work.mkdir()
  shutil.copy(path, work / path.name)
  monkeypatch.setenv('TRAINBIG_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  nb = nbformat.read(work / path.name, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(work)}})
  with compilation_cache():  # the notebooks' commands repeat programs: compiled once
    client.execute()
  errors = [o for c in nb.cells for o in c.get('outputs', []) if o.get('output_type') == 'error']
  assert not errors
