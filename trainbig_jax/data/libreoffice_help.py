"""The embedded English-French corpus: LibreOffice's help pages, aligned paragraph by paragraph.

Debian ships the LibreOffice help as one package per language (`libreoffice-help-en-us`,
`libreoffice-help-fr`). Both hold the same pages (`help/<lang>/text/.../*.html`, generated
from the same XHP sources), and every translated paragraph or heading keeps its source's `id`
attribute (`par_id3153004`, `hd_id3149312`, ...), so a page path plus an id names one aligned
pair. This builder fetches the two packages with `apt-get download` into the TFDS download
folder (kept there, so preparing again needs no network), unpacks them into a temporary folder
with `dpkg-deb -x` (no root, nothing installed) and writes array_record.

Text of a paragraph: all its text, whitespace collapsed, with LibreOffice's inline "switch"
variants resolved to their default case (a hidden `<span>` whose id does not start with
`default` holds the text shown only in one module or on one OS, e.g. 'Command' on macOS for
'Ctrl', and is dropped). An id that occurs a different number of times in the two pages is not
aligned. Pairs with an empty side or with identical sides (untranslated strings, code, names)
are dropped.

Splits hold out whole pages: a page goes to 'validation' when the SHA-256 of its path
(relative to the language's `text` folder, e.g. 'swriter/01/06990000.html') is 0 modulo
HOLDOUT_MODULUS, to 'test' when it is 1, else to 'train'; the rule looks at the page alone,
so a page's split does not change between package versions. Pairs are unique within a split,
and a held-out pair is dropped when its English or French text also occurs in 'train' (and a
test pair when its English text occurs in 'validation'), so short strings repeated across
pages ('Example:', menu paths) cannot leak into the held-out splits. The Debian package
versions that built the data are recorded in the dataset's metadata (`info.metadata`).
"""

from __future__ import annotations

import collections
import hashlib
import html.parser
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from etils import epath
import tensorflow_datasets as tfds

from trainbig_jax.data.sources import DatasetError

# Language feature -> (Debian package, its folder under usr/share/libreoffice/help).
PACKAGES = {'en': ('libreoffice-help-en-us', 'en-US'), 'fr': ('libreoffice-help-fr', 'fr')}
HELP_ROOT = Path('usr/share/libreoffice/help')
HOLDOUT_MODULUS = 25
SPLIT_OF_BUCKET = {0: 'validation', 1: 'test'}  # every other bucket is 'train'
SPLITS = ('train', 'validation', 'test')
# Elements whose `id` aligns the two languages: paragraphs and headings.
ALIGNED_TAGS = frozenset({'p', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6'})
ALTERNATIVES = ("use data.dataset='wmt14_translate/fr-en' (downloaded once with `trainbig "
                "prepare --dataset=wmt14_translate/fr-en`) or your own parallel corpus "
                "(data.dataset='parallel:SRC_FILE,TGT_FILE')")


class DebianToolsMissingError(DatasetError):
  """apt-get or dpkg-deb, which fetch and unpack the corpus's packages, is not available."""


class PackageFetchError(DatasetError):
  """apt-get could not download a package of the corpus."""


def split_of_page(page: str) -> str:
  """'train', 'validation' or 'test' for the help page at relative path `page`."""
  digest = hashlib.sha256(page.encode('utf-8')).digest()
  return SPLIT_OF_BUCKET.get(int.from_bytes(digest, 'big') % HOLDOUT_MODULUS, 'train')


def _require_tools() -> None:
  missing = [tool for tool in ('apt-get', 'dpkg-deb') if shutil.which(tool) is None]
  if missing:
    raise DebianToolsMissingError(
        f'The embedded English-French corpus is built from Debian packages with apt-get and '
        f'dpkg-deb, but {" and ".join(missing)} is not on PATH; {ALTERNATIVES}.')


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
  return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def fetch_package(package: str, cache_dir: Path) -> Path:
  """The .deb of `package` in `cache_dir`, downloaded with `apt-get download` if absent."""
  _require_tools()
  cache_dir.mkdir(parents=True, exist_ok=True)
  debs = sorted(cache_dir.glob(f'{package}_*.deb'))
  if not debs:
    # apt-get writes the file into its working directory under its final name only when the
    # download is complete, so an interrupted fetch leaves no partial .deb behind.
    result = _run(['apt-get', 'download', package], cache_dir)
    debs = sorted(cache_dir.glob(f'{package}_*.deb'))
    if result.returncode or not debs:
      errors = [l for l in result.stderr.splitlines() if l.startswith('E:')] or [
          result.stderr.strip() or f'exit status {result.returncode}']
      hint = (' (no package lists yet: run `apt-get update` once, as root)'
              if 'Unable to locate package' in result.stderr else '')
      raise PackageFetchError(
          f'`apt-get download {package}` failed: {errors[-1]}{hint}; {ALTERNATIVES}.')
  return debs[-1]


def package_version(deb: Path) -> str:
  """The Debian version of a .deb file (e.g. '4:7.4.7-1+deb12u14')."""
  _require_tools()
  result = _run(['dpkg-deb', '-f', str(deb), 'Version'], deb.parent)
  if result.returncode:
    raise DatasetError(f'{deb} is not a readable Debian package ({result.stderr.strip()}); '
                       'delete it to download it again.')
  return result.stdout.strip()


def unpack_package(deb: Path, target: Path) -> Path:
  """Unpacks `deb` into the folder `target` with `dpkg-deb -x`; returns `target`."""
  _require_tools()
  result = _run(['dpkg-deb', '-x', str(deb), str(target)], deb.parent)
  if result.returncode:
    raise DatasetError(f'`dpkg-deb -x {deb}` failed: {result.stderr.strip()}; delete the '
                       'file to download it again.')
  return target


class _ParagraphParser(html.parser.HTMLParser):
  """Collects (id, text) of every paragraph or heading with an id, in document order."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.paragraphs: list[tuple[str, str]] = []
    self._tag: str | None = None  # the open aligned element, if any
    self._id = ''
    self._parts: list[str] = []
    self._hidden_depth = 0  # >0 inside a non-default switch case of the open element

  def handle_starttag(self, tag, attrs):
    if self._tag is None:
      element_id = dict(attrs).get('id')
      if tag in ALIGNED_TAGS and element_id:
        self._tag, self._id, self._parts, self._hidden_depth = tag, element_id, [], 0
      return
    if self._hidden_depth:
      self._hidden_depth += tag == 'span'
    elif tag == 'span':
      attributes = dict(attrs)
      if 'hidden' in attributes and not (attributes.get('id') or '').startswith('default'):
        self._hidden_depth = 1
    elif tag == 'br':
      self._parts.append(' ')

  def handle_endtag(self, tag):
    if self._tag is None:
      return
    if self._hidden_depth:
      self._hidden_depth -= tag == 'span'
    elif tag == self._tag:
      self.paragraphs.append((self._id, ' '.join(''.join(self._parts).split())))
      self._tag = None

  def handle_data(self, data):
    if self._tag is not None and not self._hidden_depth:
      self._parts.append(data)


def read_paragraphs(path: Path) -> list[tuple[str, str]]:
  """(id, text) of the paragraphs and headings of one help page, in document order."""
  parser = _ParagraphParser()
  parser.feed(path.read_text(encoding='utf-8'))
  parser.close()
  return parser.paragraphs


def aligned_pairs(en_dir: Path, fr_dir: Path) -> Iterator[tuple[str, str, str, str]]:
  """(page, id, English, French) of every id present equally often on both versions of a page
  that exists in both folders, pages in sorted order, paragraphs in document order."""
  for en_path in sorted(en_dir.rglob('*.html')):
    page = en_path.relative_to(en_dir).as_posix()
    fr_path = fr_dir / page
    if not fr_path.is_file():
      continue
    french = collections.defaultdict(list)
    for paragraph_id, text in read_paragraphs(fr_path):
      french[paragraph_id].append(text)
    english = read_paragraphs(en_path)
    counts = collections.Counter(paragraph_id for paragraph_id, _ in english)
    seen = collections.Counter()
    for paragraph_id, text in english:
      if counts[paragraph_id] != len(french.get(paragraph_id, ())):
        continue
      yield page, paragraph_id, text, french[paragraph_id][seen[paragraph_id]]
      seen[paragraph_id] += 1


def split_pairs(pairs: Iterator[tuple[str, str, str, str]]
                ) -> dict[str, list[tuple[str, str, str, str]]]:
  """Split name -> [(page, id, en, fr)]: filtered, unique, held out by page, without leaks."""
  by_split: dict[str, list[tuple[str, str, str, str]]] = {name: [] for name in SPLITS}
  for page, paragraph_id, en, fr in pairs:
    if en and fr and en != fr:
      by_split[split_of_page(page)].append((page, paragraph_id, en, fr))
  seen_en: set[str] = set()
  seen_fr: set[str] = set()
  result = {}
  # 'train' first: its texts are what the held-out splits must not contain.
  for name in SPLITS:
    kept, pairs_here = [], set()
    for row in by_split[name]:
      en, fr = row[2], row[3]
      if (en, fr) in pairs_here or (name != 'train' and (en in seen_en or fr in seen_fr)):
        continue
      pairs_here.add((en, fr))
      kept.append(row)
    result[name] = kept
    seen_en.update(row[2] for row in kept)
    # The French side is checked against 'train' only: validation and test share no page,
    # and a repeated French heading under a different English one is not a leak of the source.
    if name == 'train':
      seen_fr.update(row[3] for row in kept)
  return result


class LibreOfficeHelpEnFr(tfds.core.GeneratorBasedBuilder):
  """English-French paragraphs of the LibreOffice help, aligned by page and paragraph id."""

  name = 'trainbig_libreoffice_enfr'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Paragraphs aligned by page and id; whole pages held out.'}
  # Nothing is downloaded through TFDS, so there are no URL checksums (and no lookup of them).
  url_infos = None

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # See data/sotu.py: tfds's default lookup needs a package it does not declare.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'en': tfds.features.Text(),
            'fr': tfds.features.Text(),
            'page': tfds.features.Text(),  # help page path, e.g. swriter/01/06990000.html
        }),
        supervised_keys=('en', 'fr'),
        homepage='https://packages.debian.org/source/stable/libreoffice',
        # Filled while preparing: the Debian package versions the corpus was built from.
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cache_dir = Path(dl_manager.download_dir) / self.name
    debs = {lang: fetch_package(package, cache_dir) for lang, (package, _) in PACKAGES.items()}
    for lang, deb in debs.items():
      self.info.metadata[f'debian_{lang}'] = f'{PACKAGES[lang][0]}={package_version(deb)}'
    # Only the .deb files are kept: the unpacked pages (60 MB) are read once, here.
    with tempfile.TemporaryDirectory(dir=cache_dir) as unpacked:
      texts = {}
      for lang, deb in debs.items():
        root = unpack_package(deb, Path(unpacked) / lang)
        texts[lang] = root / HELP_ROOT / PACKAGES[lang][1] / 'text'
      splits = split_pairs(aligned_pairs(texts['en'], texts['fr']))
    if not all(splits.values()):
      raise DatasetError(
          f'The packages {", ".join(d.name for d in debs.values())} gave no aligned pairs for '
          f'some split ({", ".join(f"{k}: {len(v)}" for k, v in splits.items())}); their '
          f'layout is not {HELP_ROOT}/<lang>/text/**/*.html as expected.')
    return {name: self._generate_examples(rows) for name, rows in splits.items()}

  def _generate_examples(self, rows):
    occurrence = collections.Counter()
    for page, paragraph_id, en, fr in rows:
      # An id that repeats on a page (a reused snippet) gets its occurrence number in the key.
      occurrence[page, paragraph_id] += 1
      yield f'{page}#{paragraph_id}#{occurrence[page, paragraph_id]}', {
          'en': en, 'fr': fr, 'page': page}
