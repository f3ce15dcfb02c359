"""The bad inputs the tests try, one row each: what a user gives and the line they get back.

tests/test_errors.py runs every row (and checks that nothing partial was written);
docs/errors.md is generated from this table:

  python tests/error_cases.py        # rewrites docs/errors.md
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / 'docs' / 'errors.md'


@dataclasses.dataclass(frozen=True)
class Case:
  """One bad input.

  kind says how the test runs it: 'cli' runs the argv through the CLI entry point ({run},
  {tmp}, {file} and {compressed} are replaced by a finished run folder, a fresh folder, an
  existing file and a compressed checkpoint; {readonly} and {readonly_parent} by a copy of
  the run and an empty folder, neither writable); 'pretrain', 'finetune', 'compress' and
  'sweep' override the named config fields of that command's test preset; 'target' runs a
  command on a damaged or unusual folder made by the named recipe.
  """
  name: str
  kind: str
  args: tuple
  message: str  # a fragment of the one line the user gets (after 'trainbig: error: ')
  bad_input: str  # what is wrong, for the doc


def _cfg(kind, field, value, message, bad=None):
  return Case(f'{kind}:{field}={value!r}', kind, ((field, value),), message,
              bad or f'`--config.{field}={value}`')


CASES: tuple[Case, ...] = (
    # ------------------------------------------------------------ command line
    Case('cli:no command', 'cli', (), "Unknown command '(none)'", 'no command'),
    Case('cli:unknown command', 'cli', ('fly',), "Unknown command 'fly'", 'a command that does not exist'),
    Case('cli:positional', 'cli', ('eval', 'extra'), "Unexpected arguments ['extra']",
         'a positional argument'),
    Case('cli:train needs workdir', 'cli', ('train', '--config=configs/pretrain.py:tiny'),
         'trainbig train needs --workdir', '`train` without `--workdir`'),
    Case('cli:compress needs out', 'cli', ('compress', '--checkpoint={run}',
                                           '--config=configs/compress.py:int8'),
         'trainbig compress needs --out', '`compress` without `--out`'),
    Case('cli:eval needs checkpoint', 'cli', ('eval',), 'trainbig eval needs --checkpoint',
         '`eval` without `--checkpoint`'),
    Case('cli:config missing', 'cli', ('train', '--config={tmp}/nope.py:tiny', '--workdir={tmp}/w'),
         'No such file or directory', '`--config=` a file that does not exist'),
    Case('cli:config yaml', 'cli', ('train', '--config={file}:tiny', '--workdir={tmp}/w'),
         'is not a Python config file', '`--config=` a file that is not Python (YAML)'),
    Case('cli:config binary', 'cli', ('train', '--config={tmp}/binary.py', '--workdir={tmp}/w'),
         "is not a Python config file: (unicode error) 'utf-8' codec can't decode",
         '`--config=` a non-UTF-8 file'),
    Case('cli:config no get_config', 'cli', ('train', '--config={tmp}/noget.py',
                                             '--workdir={tmp}/w'),
         'has no get_config(preset) function', '`--config=` a Python file without get_config'),
    Case('cli:unknown preset', 'cli', ('train', '--config=configs/pretrain.py:nope',
                                       '--workdir={tmp}/w'),
         "Unknown pretrain preset 'nope'", 'a preset that does not exist'),
    Case('cli:unknown field', 'cli', ('train', '--config=configs/pretrain.py:tiny',
                                      '--config.train.no_such=1', '--workdir={tmp}/w'),
         'no such field', 'an override of a field that does not exist'),
    Case('cli:bad field type', 'cli', ('train', '--config=configs/pretrain.py:tiny',
                                       '--config.train.total_steps=abc', '--workdir={tmp}/w'),
         "invalid literal for int() with base 10: 'abc'", 'an override of the wrong type'),
    Case('cli:workdir is a file', 'cli', ('train', '--config=configs/pretrain.py:tiny',
                                          '--workdir={file}'),
         'is a file, not a folder', '`--workdir=` an existing file'),
    Case('cli:workdir under a file', 'cli', ('train', '--config=configs/pretrain.py:tiny',
                                             '--workdir={file}/run'),
         'which is a file', '`--workdir=` a path under an existing file'),
    Case('cli:workdir not writable', 'cli', ('train', '--config=configs/pretrain.py:tiny',
                                              '--workdir={readonly}'),
         'is not writable (Permission denied)',
         '`--workdir=` a run folder without write permission'),
    Case('cli:workdir parent not writable', 'cli',
         ('train', '--config=configs/pretrain.py:tiny', '--workdir={readonly_parent}/run'),
         'cannot be created', '`--workdir=` a new folder inside one without write permission'),
    Case('cli:eval missing', 'cli', ('eval', '--checkpoint={tmp}/nope'), 'does not exist',
         '`eval --checkpoint=` a path that does not exist'),
    # ------------------------------------------------------------ pretraining configs
    _cfg('pretrain', 'model.hidden', -64, 'model.hidden=-64 is invalid'),
    _cfg('pretrain', 'model.num_layers', 0, 'model.num_layers=0 is invalid'),
    _cfg('pretrain', 'model.num_heads', 3, 'model.num_heads=3 does not divide model.hidden=32'),
    _cfg('pretrain', 'model.dtype', 'float8', "model.dtype='float8' is invalid"),
    _cfg('pretrain', 'model.dropout', 1.0, 'model.dropout=1.0 is invalid'),
    _cfg('pretrain', 'data.vocab_size', 8, 'data.vocab_size=8 is invalid'),
    _cfg('pretrain', 'data.seq_len', 2, 'data.seq_len=2 is invalid'),
    _cfg('pretrain', 'data.seq_len', 64, 'data.seq_len=64 exceeds model.max_len=34'),
    _cfg('pretrain', 'data.mask_rate', 0.0, 'data.mask_rate=0.0 is invalid'),
    _cfg('pretrain', 'data.mask_token_prob', 0.95, 'must be >= 0 and sum to at most 1'),
    _cfg('pretrain', 'train.batch_size', 12, 'train.batch_size=12 gives micro-batches of 12, not divisible by the 8'),
    _cfg('pretrain', 'train.grad_accum_steps', 3, 'not divisible by train.grad_accum_steps=3'),
    _cfg('pretrain', 'train.total_steps', 0, 'train.total_steps=0 is invalid'),
    _cfg('pretrain', 'train.keep_checkpoints', 0, 'train.keep_checkpoints=0 is invalid'),
    _cfg('pretrain', 'train.learning_rate', 0.0, 'train.learning_rate=0.0 must be > 0'),
    _cfg('pretrain', 'train.warmup_steps', -1, 'train.warmup_steps=-1 must be >= 0'),
    _cfg('pretrain', 'train.budget_s', -1.0, 'train.budget_s=-1.0 is invalid'),
    _cfg('pretrain', 'train.max_nonfinite_skips', -1,
         'train.max_nonfinite_skips=-1 must be an integer >= 0'),
    _cfg('pretrain', 'mesh.shape', (3, 1, 1), 'mesh.shape=(3, 1, 1) needs 3 devices'),
    Case('pretrain:resume other model', 'target', ('resume_other_model',),
         'holds a run with other model settings (hidden)',
         'resuming a run folder with another model width'),
    Case('pretrain:resume other vocab', 'target', ('resume_other_vocab',),
         'holds a run with other data settings (vocab_size)',
         'resuming a run folder with another vocabulary size'),
    Case('eval:tokenizer not SentencePiece', 'target', ('eval_garbage_tokenizer',),
         'is not a SentencePiece model', 'a run whose tokenizer.model is not a tokenizer'),
    # ------------------------------------------------------------ data and tokenizers
    _cfg('pretrain', 'data.dataset', 'nope', "Unknown dataset 'nope'"),
    Case('pretrain:files glob matches nothing', 'target', ('files_no_match',),
         'no file matches', '`--config.data.dataset=files:GLOB` matching no file'),
    Case('pretrain:text file not UTF-8', 'target', ('files_not_utf8',),
         'bad.txt:3 is not UTF-8 text (byte 0xe9 at column 4)',
         'a user text file that is not UTF-8 (Latin-1 on line 3)'),
    Case('pretrain:text file empty', 'target', ('files_empty',), 'hold no examples',
         'an empty user text file'),
    Case('pretrain:tokenizer of another size', 'target', ('pretrain_other_tokenizer',),
         'has vocab_size 300 but data.vocab_size=512',
         '`--config.data.tokenizer_path=` a tokenizer of another vocabulary size'),
    Case('eval:tokenizer of another size', 'target', ('eval_other_tokenizer',),
         'holds embed/token/embedding of shape (512, 32), but the model made from its config '
         'and tokenizer (300 pieces) needs (300, 32)',
         "a run whose tokenizer.model was replaced by one that does not match its embedding"),
    Case('finetune:tokenizer of another size', 'target', ('finetune_other_tokenizer',),
         'is incompatible: embed/token/embedding has shape (512, 32) but this model needs '
         '(300, 32)', '`--init_checkpoint=` a run whose tokenizer.model does not match its '
         'embedding'),
    Case('translate:wrong kind', 'target', ('translate_mlm_run',),
         "is a 'mlm' run; trainbig translate needs a 'translate' one",
         '`translate --checkpoint=` a pretraining (MLM) run'),
    # ------------------------------------------------------------ compression
    _cfg('compress', 'prune.sparsity', 1.0, 'prune.sparsity=1.0 is invalid: allowed [0, 1)'),
    _cfg('compress', 'prune.sparsity', -0.1, 'prune.sparsity=-0.1 is invalid'),
    _cfg('compress', 'prune.method', 'random', "prune.method='random' is invalid"),
    _cfg('compress', 'prune.scope', 'row', "prune.scope='row' is invalid"),
    _cfg('compress', 'quant.bits', 1, 'bits'),
    _cfg('compress', 'quant.bits', 9, 'bits'),
    _cfg('compress', 'quant.granularity', 'per_row', "quant.granularity='per_row' is invalid"),
    Case("compress:heads80 on 2 heads", 'compress',
         (('prune.method', 'heads'), ('prune.sparsity', 0.8)),
         'Pruning 0.8 of the 2 heads of layers_0/attention (attention) would remove all of them',
         '`heads80`: structured pruning of 80% of the heads of a 2-head model'),
    Case("compress:neurons all", 'compress',
         (('prune.method', 'neurons'), ('prune.sparsity', 0.999)),
         'Pruning 0.999 of the 128 neurons of layers_0/mlp (MLP) would remove all of them',
         'structured pruning of 99.9% of 128 MLP neurons'),
    Case('compress:out exists', 'target', ('compress_out_exists',), 'already exists',
         '`compress --out=` an existing folder'),
    Case('compress:checkpoint missing', 'target', ('compress_missing',), 'does not exist',
         '`compress --checkpoint=` a path that does not exist'),
    Case('compress:not a run', 'target', ('compress_empty_folder',),
         'is not a trainbig run folder: it has no config.json',
         '`compress --checkpoint=` a folder that is not a run'),
    Case('compress:damaged', 'target', ('compress_damaged',), 'is damaged and cannot be read',
         '`compress --checkpoint=` a run whose newest array files were truncated'),
    # ------------------------------------------------------------ evaluation
    Case('eval:not a run', 'target', ('eval_empty_folder',),
         'is not a trainbig run folder: it has no config.json',
         '`eval --checkpoint=` a folder that is not a run'),
    Case('eval:garbled config', 'target', ('eval_garbled_config',),
         'config.json is damaged: not a JSON config', 'a run whose config.json was garbled'),
    Case('eval:no checkpoint', 'target', ('eval_no_checkpoint',), 'has no complete checkpoint',
         'a run folder with no complete checkpoint'),
    Case('eval:damaged array', 'target', ('eval_damaged',), 'is damaged and cannot be read',
         'a run whose newest checkpoint has truncated array files'),
    Case('eval:compressed checksum', 'target', ('eval_tampered_compressed',),
         'does not match its checksum', 'a compressed checkpoint whose payload bytes changed'),
    Case('eval:compressed manifest', 'target', ('eval_garbled_manifest',), 'Cannot read',
         'a compressed checkpoint with a garbled manifest'),
    Case('eval:compressed other format', 'target', ('eval_other_format',),
         "is format 'other' version", 'a compressed checkpoint of another format'),
    Case('finetune:edited config', 'target', ('finetune_edited_config',), 'is incompatible',
         '`--init_checkpoint=` a run whose config.json was edited (another width)'),
    # ------------------------------------------------------------ fine-tuning
    Case('finetune:init missing', 'target', ('finetune_missing',), 'does not exist',
         '`finetune --init_checkpoint=` a path that does not exist'),
    Case('finetune:init not a run', 'target', ('finetune_empty_folder',),
         'is not a trainbig run folder', '`--init_checkpoint=` a folder that is not a run'),
    Case('finetune:init damaged', 'target', ('finetune_damaged',),
         'is damaged and cannot be read', '`--init_checkpoint=` a run with truncated array files'),
    Case('finetune:init compressed', 'target', ('finetune_compressed',),
         'has no complete checkpoint', '`--init_checkpoint=` a compressed checkpoint'),
    Case('finetune:no tokenizer', 'target', ('finetune_no_tokenizer',),
         'has no tokenizer.model', '`--init_checkpoint=` a run without its tokenizer'),
    _cfg('finetune', 'task', 'nope', "'nope'"),
    _cfg('finetune', 'max_len', 64, "max_len=64 exceeds the pretrained model's 34 positions"),
    _cfg('finetune', 'compression.prune.final_sparsity', 1.0,
         'compression.prune.final_sparsity=1.0 is invalid'),
    # ------------------------------------------------------------ sweeps
    _cfg('sweep', 'sizes', (), 'sizes is empty'),
    _cfg('sweep', 'sizes', ((0, 32),), 'sizes entry (0, 32) is invalid'),
    _cfg('sweep', 'pretrain_budget_s', 0.0, 'pretrain_budget_s=0.0 must be > 0 seconds'),
    _cfg('sweep', 'sparsities', (1.5,), 'sparsity 1.5 in the grid is invalid'),
    _cfg('sweep', 'bits', (9,), 'bits 9 in the grid is invalid'),
    Case('sweep:changed config', 'target', ('sweep_changed',), 'holds a sweep with other settings',
         'resuming a sweep folder with another sweep config'),
    Case('train:busy folder', 'target', ('busy_folder',),
         'is being written by another live process (pid',
         'a second `train` on a folder a live process is writing'),
)


def markdown() -> str:
  rows = ['# Errors a user can cause', '',
          'Every row is a bad input that `tests/test_errors.py` tries; the command ends with',
          '`trainbig: error: ` and one line containing the message shown, exit status 2, and the',
          'test checks that nothing was written or changed (a refused run folder keeps every',
          'byte; a refused output folder does not appear). Generated from `tests/error_cases.py`',
          '(`python tests/error_cases.py`); a test checks that this file is current.', '',
          f'{len(CASES)} rows.', '',
          '| # | command | bad input | message (fragment) |', '| --- | --- | --- | --- |']
  for i, case in enumerate(CASES, 1):
    command = case.name.split(':')[0]
    message = case.message.replace('|', '\\|')
    rows.append(f'| {i} | {command} | {case.bad_input.replace("|", chr(92) + "|")} | '
                f'`{message}` |')
  return '\n'.join(rows) + '\n'


if __name__ == '__main__':
  DOC.write_text(markdown())
  print(f'{DOC}: {len(CASES)} rows')
