"""The device decoding path, on the CPU: the fallback of the GPU path, and what it is compared with.

The same code runs on CUDA (nvJPEG) in tests/unit/test_training_gpu.py; here libjpeg decodes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _images import ODD_FORMATS, write_large_photo, write_odd_formats

from plantml.training import synth
from plantml.training.data import scan_image_folder
from plantml.training.device_data import DeviceLoader, build_device_loaders, decode_images
from plantml.training.image_decode import EncodedImages, decode_on_device, is_jpeg, read_encoded

CPU = torch.device("cpu")
#: PIL and torchvision decode JPEGs with the same libjpeg; PIL's resize and torch's antialiased
#: bilinear one differ by rounding only: one level of 255 at most (measured: 0.16-0.21 on average).
MAX_LEVELS = 1
MEAN_LEVELS = 0.25


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("png") / "leaves", synth.SynthSpec(per_class=6, size=48, seed=5))


@pytest.fixture(scope="module")
def jpegs(pngs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.as_jpeg(pngs, tmp_path_factory.mktemp("jpeg") / "leaves")


def test_the_jpeg_copy_is_an_image_folder_of_jpegs(jpegs: Path) -> None:
    scan = scan_image_folder(jpegs)
    assert scan.classes == synth.CLASSES and len(scan.samples) == 12
    assert all(path.suffix == ".jpg" and is_jpeg(path.read_bytes()) for path, _ in scan.samples)


def test_jpeg_is_told_by_its_bytes_not_its_name(tmp_path: Path, pngs: Path) -> None:
    png = next(pngs.glob("*/*.png"))
    disguised = tmp_path / "photo.jpg"
    disguised.write_bytes(png.read_bytes())
    [data] = read_encoded([disguised])
    assert not is_jpeg(data) and not is_jpeg(b"") and is_jpeg(b"\xff\xd8\xff\xe0")


@pytest.mark.parametrize("image_size", [32, 48, 64])
@pytest.mark.parametrize("folder", ["jpegs", "pngs"])
def test_decoding_on_the_device_path_matches_the_pil_path(folder: str, image_size: int,
                                                          request: pytest.FixtureRequest) -> None:
    samples = scan_image_folder(request.getfixturevalue(folder)).samples
    pil, _ = decode_images(samples, image_size)
    device = decode_on_device(read_encoded([path for path, _ in samples]), image_size, CPU)
    assert device.dtype == torch.uint8 and device.shape == (len(samples), 3, image_size, image_size)
    difference = (device.float() - pil.float()).abs()
    assert difference.max() <= MAX_LEVELS and difference.mean() <= MEAN_LEVELS, (float(difference.max()), float(difference.mean()))
    if image_size == 48 and folder == "pngs":  # no decoding nor resizing difference at all
        assert torch.equal(device, pil)


@pytest.mark.parametrize("wrong", ["channels swapped", "upside down", "gray"])
@pytest.mark.parametrize("image_size", [32, 224])
def test_the_gpu_decode_tolerance_still_tells_a_wrong_picture(jpegs: Path, image_size: int, wrong: str) -> None:
    """The GPU test's tolerance is wide enough for nvJPEG's rounding, not for a decode that gets the picture wrong."""
    from test_training_gpu import GPU_DECODE_TOLERANCE

    right = decode_on_device(read_encoded([path for path, _ in scan_image_folder(jpegs).samples]), image_size, CPU).float()
    picture = {"channels swapped": right.flip(1), "upside down": right.flip(2),
               "gray": right.mean(dim=1, keepdim=True).expand_as(right)}[wrong]
    mean_levels = max(mean for mean, _ in GPU_DECODE_TOLERANCE.values())
    assert (picture - right).abs().mean() > 2 * mean_levels


@pytest.fixture(scope="module")
def odd_formats(pngs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_odd_formats(sorted(pngs.glob("*/*.png"))[0], tmp_path_factory.mktemp("odd"))


@pytest.mark.parametrize("image_size", [32, 48])
@pytest.mark.parametrize("kind", ODD_FORMATS)
def test_every_format_the_scan_accepts_decodes_on_the_device_path_as_on_the_pil_path(kind: str, image_size: int,
                                                                                       odd_formats: dict[str, Path]) -> None:
    """BMP, TIFF, PPM/PGM (which torchvision cannot decode), CMYK and gray JPEGs, 16-bit PNGs."""
    path = odd_formats[kind]
    pil, _ = decode_images([(path, 0)], image_size)
    device = decode_on_device(read_encoded([path]), image_size, CPU)
    difference = (device.float() - pil.float()).abs()
    assert difference.max() <= MAX_LEVELS and difference.mean() <= MEAN_LEVELS, (float(difference.max()), float(difference.mean()))


def test_a_16_bit_png_keeps_its_picture_instead_of_turning_white(odd_formats: dict[str, Path]) -> None:
    """Pillow's own conversion clips 16-bit grayscale at 255: every pixel above 1/256 of the range turns white."""
    eight_bit, _ = decode_images([(odd_formats["pgm (gray)"], 0)], 48)
    for kind in ("16-bit gray png", "16-bit rgb png"):
        sixteen_bit, _ = decode_images([(odd_formats[kind], 0)], 48)
        assert sixteen_bit.float().mean() < 250
        if kind == "16-bit gray png":
            assert torch.equal(sixteen_bit, eight_bit)  # v * 257 keeps v as its high byte


@pytest.mark.parametrize("image_size", [16, 32, 224])
def test_a_photo_over_64_times_the_size_is_shrunk_in_steps_like_pil_does_at_once(image_size: int, tmp_path: Path) -> None:
    """Two antialiased steps instead of one (CUDA's kernel refuses factors past about 94): two levels at most
    (measured: 2, mean 0.25 at 32 px)."""
    photo = write_large_photo(tmp_path / "phone.jpg")  # 4000 x 3000: 250 times 16 px
    pil, _ = decode_images([(photo, 0)], image_size)
    device = decode_on_device(read_encoded([photo]), image_size, CPU)
    difference = (device.float() - pil.float()).abs()
    assert difference.max() <= 2 and difference.mean() <= 0.5, (float(difference.max()), float(difference.mean()))


def test_a_mixed_folder_keeps_its_order(jpegs: Path, pngs: Path) -> None:
    paths = [next(jpegs.glob("healthy/*.jpg")), next(pngs.glob("diseased/*.png")), next(jpegs.glob("diseased/*.jpg"))]
    together = decode_on_device(read_encoded(paths), 32, CPU)
    one_by_one = torch.cat([decode_on_device(read_encoded([path]), 32, CPU) for path in paths])
    assert torch.equal(together, one_by_one)


def test_a_streamed_loader_gives_the_batches_of_a_resident_one(jpegs: Path) -> None:
    """Kept encoded and decoded per batch, or decoded once: the same batches for a seed, in the same order."""
    scan = scan_image_folder(jpegs)
    encoded = EncodedImages.read([path for path, _ in scan.samples], 32, CPU)
    labels = torch.as_tensor([label for _, label in scan.samples])
    assert 0 < encoded.nbytes < len(encoded) * 3 * 48 * 48
    resident = DeviceLoader(encoded.decode_all(), labels, batch_size=5, device=CPU, train=True, seed=3)
    streamed = DeviceLoader(encoded, labels, batch_size=5, device=CPU, train=True, seed=3)
    assert streamed.streamed and not resident.streamed and len(streamed) == len(resident) == 3
    for _epoch in range(2):
        for (a, a_labels), (b, b_labels) in zip(resident, streamed, strict=True):
            assert torch.equal(a, b) and torch.equal(a_labels, b_labels)
    image, label = streamed.dataset[4]
    assert image.shape == (3, 32, 32) and label == int(labels[4])


def test_streaming_needs_cuda_and_the_cpu_keeps_the_pil_path(jpegs: Path) -> None:
    from plantml.training.data import stratified_split

    scan = scan_image_folder(jpegs)
    split = stratified_split([label for _, label in scan.samples], 0.25, 0.25)
    loaders = build_device_loaders(scan, split, image_size=32, batch_size=4, device=CPU, seed=0, channels_last=False)
    assert loaders.extra == {"data_on_device": True, "decode": "cpu", "streamed": False}
    assert sum(len(loader.labels) for loader in (loaders.train, loaders.val, loaders.test)) == 12
    with pytest.raises(ValueError, match="needs a CUDA device"):
        build_device_loaders(scan, split, image_size=32, batch_size=4, device=CPU, seed=0, channels_last=False,
                             streamed=True)


def plain_batch(raw: torch.Tensor, rand: torch.Tensor | None) -> torch.Tensor:
    """A batch as the loader built it before: float first, each step a new tensor."""
    from plantml.training.data import IMAGENET_MEAN, IMAGENET_STD

    images = raw.float()
    if rand is not None:
        n = images.shape[0]
        images = torch.where(rand[:, 0].view(n, 1, 1, 1) < 0.5, images.flip(3), images)
        images = torch.where(rand[:, 1].view(n, 1, 1, 1) < 0.5, images.flip(2), images)
        brightness = (0.9 + 0.2 * rand[:, 2]).view(n, 1, 1, 1)
        contrast = (0.9 + 0.2 * rand[:, 3]).view(n, 1, 1, 1)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = ((images * brightness - mean) * contrast + mean).clamp_(0, 255)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (images - mean) / std


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_batches_keep_the_order_and_augmentations_a_seed_gave_before(jpegs: Path, train: bool, channels_last: bool) -> None:
    """Flips on uint8, the layout changed first, float steps in place: the same batches as the plain formula."""
    scan = scan_image_folder(jpegs)
    raw = EncodedImages.read([path for path, _ in scan.samples], 32, CPU).decode_all()
    labels = torch.as_tensor([label for _, label in scan.samples])
    loader = DeviceLoader(raw, labels, batch_size=5, device=CPU, train=train, seed=9, channels_last=channels_last)
    draws = torch.Generator().manual_seed(9)
    order = torch.randperm(len(labels), generator=draws) if train else torch.arange(len(labels))
    for start, (images, batch_labels) in zip(range(0, len(order), 5), loader, strict=True):
        index = order[start:start + 5]
        rand = torch.rand((len(index), 4), generator=draws) if train else None
        assert torch.equal(batch_labels, labels[index])
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(images, plain_batch(raw[index], rand), rtol=0, atol=1e-5)


def test_exif_orientation_is_not_applied_on_either_path_as_in_torchvision(tmp_path: Path) -> None:
    """The README's word: a photo tagged "rotate 90°" (EXIF orientation 6) trains as its pixels are stored, on the
    PIL path and on the device path alike; were one of them to apply the tag, the red half would be on top there."""
    from PIL import Image

    picture = Image.new("RGB", (64, 32), (0, 200, 0))
    picture.paste((200, 0, 0), (0, 0, 32, 32))  # left half red, right half green
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to show
    path = tmp_path / "tagged.jpg"
    picture.save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as saved:
        assert saved.getexif()[0x0112] == 6

    pil, _ = decode_images([(path, 0)], 32)
    device = decode_on_device(read_encoded([path]), 32, CPU)
    for decoded in (pil[0].float(), device[0].float()):
        left, right = decoded[:, :, :8].mean(dim=(1, 2)), decoded[:, :, -8:].mean(dim=(1, 2))
        assert left[0] > 150 > left[1] and right[1] > 150 > right[0], (left, right)  # red left, green right
    difference = (device.float() - pil.float()).abs()
    assert difference.max() <= MAX_LEVELS and difference.mean() <= MEAN_LEVELS
