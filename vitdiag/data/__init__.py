"""Dataset sources, the model's evaluation transform at a size, and loaders.

Sources (``open_dataset``):

- an ImageFolder directory: two or more class sub-folders; labels are the folder names in timm's
  ImageFolder order (natural sort: ``class2`` before ``class10``), which ``data.labels`` then
  maps onto the model's outputs (by name when the model carries class names);
- a flat folder of images (or a folder with a single sub-folder): unlabelled, targets -1;
- a ``.tar`` of images: labelled by the member's parent folder when there are two or more distinct
  parents, else unlabelled;
- timm ``create_dataset`` sources with random access: ``torch/NAME:ROOT`` (torchvision datasets,
  never downloaded);
- Hugging Face datasets (``data.hf``, needs the ``datasets`` package): a ``save_to_disk`` folder,
  a folder of Parquet files, or ``hfds/NAME[:CACHE_DIR]`` from the local hub cache (never
  downloaded); labels are the ClassLabel's names, matched by name like class folders;
- ``synthetic`` / ``synthetic:N``: i.i.d. N(0, 1) images in the *normalised* space, seeded per
  index, so a run is reproducible whatever the batch size, worker count or sharding.

Policies worth knowing:

- Alpha is dropped, not composited (RGBA / LA / PA / palette with transparency keep the colour
  stored under each pixel). This is what timm's ``ImageDataset`` and torchvision's ``pil_loader``
  do (``convert("RGB")``), so vitdiag sees the same pixels as ``timm validate.py``. 16-bit
  grayscale is scaled to 8 bits (PIL alone would clip everything above 255 to white).
- Unreadable files are skipped and counted per ``Batch``; a batch whose every item failed is not
  yielded, its count is carried into a neighbouring batch, so the counts still sum exactly. With
  ``strict=True`` the first unreadable file (in loader order) raises ``UnreadableImageError``
  naming it. A loader that reaches its end having yielded nothing because every image failed
  raises ``VitdiagError``: checking up front would mean decoding the whole dataset twice.
- Synthetic images need a size: ``eval_transform`` returns an ``EvalTransform`` that carries its
  output ``size``, and ``make_loader`` takes the size from it (falling back to ``source.size``
  when a plain callable is passed). The transform itself is skipped for synthetic sources.
"""

from vitdiag.data.labels import LABEL_MODES, ClassIndices, class_indices
from vitdiag.data.loader import (
    Batch,
    Loader,
    ViewMaker,
    make_loader,
    merged_views,
    select_indices,
)
from vitdiag.data.open import open_dataset
from vitdiag.data.sources import (
    IMAGE_EXTENSIONS,
    ImageSource,
    UnreadableImageError,
    class_order,
    decode_image,
    to_rgb,
)
from vitdiag.data.transforms import EvalTransform, eval_transform
from vitdiag.hardware import DEFAULT_WORKERS, default_workers

__all__ = [
    "DEFAULT_WORKERS",
    "ViewMaker",
    "default_workers",
    "IMAGE_EXTENSIONS",
    "Batch",
    "ClassIndices",
    "LABEL_MODES",
    "class_indices",
    "class_order",
    "EvalTransform",
    "ImageSource",
    "Loader",
    "UnreadableImageError",
    "decode_image",
    "eval_transform",
    "make_loader",
    "merged_views",
    "open_dataset",
    "select_indices",
    "to_rgb",
]
