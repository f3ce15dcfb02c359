"""SentencePiece tokenizer: trained once per workdir on the pretraining corpus, then reused.

Special ids are fixed so that models, masking and checkpoints agree without reading the model
file: pad=0, unk=1, bos=2 ('<s>', RoBERTa's CLS), eos=3 ('</s>', RoBERTa's SEP), mask=4
('<mask>'). Training is BPE (as RoBERTa) and deterministic: the corpus is read in data-source
order, never shuffled or sampled, so the same data and config give the same model file.
"""

from __future__ import annotations

import dataclasses
import io
import os
import string
from pathlib import Path
from typing import Any, Iterator, Sequence

import ml_collections
import sentencepiece as spm

from trainbig_jax import files
from trainbig_jax.data import sources

TOKENIZER_FILENAME = 'tokenizer.model'
PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3, 4
MASK_PIECE = '<mask>'
# SentencePiece drops training sentences longer than this (bytes); paragraphs of the embedded
# corpus reach ~8 k characters, so the default 4192 would silently lose some of them.
MAX_SENTENCE_BYTES = 1 << 15
# character_coverage drops the rarest characters (on the embedded corpus that includes capital
# letters such as 'V' or 'Q'); printable ASCII is always kept so English text never hits <unk>.
REQUIRED_CHARS = ''.join(c for c in string.printable if not c.isspace())


class TokenizerError(ValueError):
  """A tokenizer cannot be trained or loaded as configured."""


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
  """A loaded SentencePiece model with the project's fixed special ids."""

  path: str
  processor: spm.SentencePieceProcessor = dataclasses.field(repr=False)

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def unk_id(self) -> int:
    return UNK_ID

  @property
  def bos_id(self) -> int:
    return BOS_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def mask_id(self) -> int:
    return MASK_ID

  @property
  def special_ids(self) -> tuple[int, ...]:
    """Ids that masking never selects and never samples as random replacements."""
    return (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""
    return self.processor.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.processor.encode(list(texts))

  def decode(self, ids: Sequence[int]) -> str:
    return self.processor.decode([int(i) for i in ids])

  def copy_to(self, directory: str | os.PathLike) -> str:
    """Copies the model file into `directory` (atomically); returns the new path."""
    target = Path(directory) / TOKENIZER_FILENAME
    if target.resolve() != Path(self.path).resolve():
      target.parent.mkdir(parents=True, exist_ok=True)
      files.atomic_write(target, Path(self.path).read_bytes())
    return str(target)

  def __reduce__(self) -> tuple[Any, tuple[str]]:
    # Lets grain worker processes receive the tokenizer: they reload it from its file.
    return load_tokenizer, (self.path,)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Loads a SentencePiece model file and checks that it has the project's special ids."""
  path = str(path)
  if not os.path.isfile(path):
    raise TokenizerError(f'Tokenizer file {path!r} does not exist.')
  processor = spm.SentencePieceProcessor()
  try:
    processor.load(path)
  except (OSError, RuntimeError) as e:
    raise TokenizerError(f'{path!r} is not a SentencePiece model ({e}).') from None
  found = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id(),
           processor.piece_to_id(MASK_PIECE))
  expected = (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID)
  if found != expected:
    raise TokenizerError(
        f'Tokenizer {path!r} has special ids (pad, unk, bos, eos, {MASK_PIECE}) = {found}; '
        f'this project needs {expected}: train one with train_or_load_tokenizer.')
  return Tokenizer(path=path, processor=processor)


def as_text(value: Any) -> str:
  """A text feature as str: TFDS data sources return Text features as bytes."""
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _training_lines(source, text_keys: Sequence[str], max_chars: int) -> Iterator[str]:
  """Non-empty lines of the corpus, in source order, up to `max_chars` characters in all."""
  remaining = max_chars
  fields = ((source[index], key) for index in range(len(source)) for key in text_keys)
  for example, text_key in fields:
    if text_key not in example:
      raise TokenizerError(f'data.text_key={text_key!r} is not a feature of the dataset; it '
                           f'has: {", ".join(sorted(example))}.')
    for line in as_text(example[text_key]).splitlines():
      line = line.strip()
      if not line:
        continue
      line = line[:remaining]
      remaining -= len(line)
      yield line
      if remaining <= 0:
        return


def _text_keys(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The features a tokenizer trains on: both languages of a translation data config (one
  shared vocabulary), else `data_config.text_key`."""
  if 'source_lang' in data_config:
    return (data_config.source_lang, data_config.target_lang)
  return (data_config.text_key,)


def train_tokenizer(lines: Iterator[str], vocab_size: int, output_path: str | os.PathLike,
                    *, num_threads: int | None = None, corpus: str = 'the corpus') -> Tokenizer:
  """Trains a BPE SentencePiece model on `lines` and writes it atomically to `output_path`."""
  # Peek so that an empty corpus fails with our message, not a SentencePiece abort.
  first = next(lines, None)
  if first is None:
    raise TokenizerError(f'Cannot train a tokenizer: {corpus} has no text.')

  def all_lines() -> Iterator[str]:
    yield first
    yield from lines
    # Every required character occurs at least once: SentencePiece 0.2.2's BPE trainer
    # aborts the whole process on a required character of frequency 0.
    yield ' '.join(REQUIRED_CHARS.replace(' ', ''))

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=all_lines(), model_writer=model, model_type='bpe',
        vocab_size=vocab_size, character_coverage=0.9995, required_chars=REQUIRED_CHARS,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece='<pad>', unk_piece='<unk>', bos_piece='<s>', eos_piece='</s>',
        user_defined_symbols=[MASK_PIECE],
        max_sentence_length=MAX_SENTENCE_BYTES,
        # Read everything given, in order: no sampling, so training is deterministic.
        input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=num_threads or min(4, os.cpu_count() or 1),
        minloglevel=2)
  except RuntimeError as e:
    raise TokenizerError(f'SentencePiece training with vocab_size={vocab_size} failed: '
                         f'{str(e).strip()}') from None
  output_path = Path(output_path)
  output_path.parent.mkdir(parents=True, exist_ok=True)
  files.atomic_write(output_path, model.getvalue())
  return load_tokenizer(output_path)


def train_or_load_tokenizer(data_config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """The run's tokenizer: `data_config.tokenizer_path`, else WORKDIR/tokenizer.model, else a
  new one trained on the train split of `data_config.dataset` (both languages of a translation
  config) and saved there."""
  if data_config.tokenizer_path:
    # The model's embedding has data.vocab_size rows (config.json records it): a tokenizer of
    # another size would train a model that its own config misdescribes.
    tokenizer = load_tokenizer(data_config.tokenizer_path)
    if tokenizer.vocab_size != data_config.vocab_size:
      raise TokenizerError(
          f'data.tokenizer_path={data_config.tokenizer_path} has vocab_size '
          f'{tokenizer.vocab_size} but data.vocab_size={data_config.vocab_size}; set '
          f'data.vocab_size={tokenizer.vocab_size} or give a tokenizer of that size.')
    return tokenizer
  path = Path(workdir) / TOKENIZER_FILENAME
  if path.exists():
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size != data_config.vocab_size:
      raise TokenizerError(
          f'{path} has vocab_size {tokenizer.vocab_size} but the config asks for '
          f'{data_config.vocab_size}; use a new workdir or set data.vocab_size='
          f'{tokenizer.vocab_size}.')
    return tokenizer
  if data_config.vocab_size <= MASK_ID + 1:
    raise TokenizerError(f'data.vocab_size={data_config.vocab_size} is too small; it must be '
                         f'larger than the {MASK_ID + 1} special tokens.')
  if data_config.tokenizer_max_chars <= 0:
    raise TokenizerError(f'data.tokenizer_max_chars={data_config.tokenizer_max_chars} must be '
                         'positive.')
  source = sources.data_source(data_config.dataset, data_config.train_split,
                               data_config.data_dir)
  lines = _training_lines(source, _text_keys(data_config), data_config.tokenizer_max_chars)
  corpus = f'split {data_config.train_split!r} of dataset {data_config.dataset!r}'
  return train_tokenizer(lines, data_config.vocab_size, path, corpus=corpus)
