"""
Rebuild data/eval_bundle.zip from an eval bundle directory, byte for byte reproducibly (data/eval_bundle.md
records the checksums it must match). A maintainer tool: runs never build the zip, they only extract it.

    python -m dev.eval_bundle_zip /path/to/eval_bundle data/eval_bundle.zip
"""

import argparse
import os
import zipfile

from nanochat.common import MissingFileError, atomic_open, exit_on_setup_error

ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can store: no build time leaks into the bytes


def write_eval_bundle_zip(bundle_dir, zip_path):
    """
    Zip bundle_dir under a top-level eval_bundle/ folder (the layout of the downloaded bundle): sorted
    entries, fixed timestamps and permissions, deflate level 9.
    """
    if not os.path.isfile(os.path.join(bundle_dir, "core.yaml")):  # a wrong path would write an empty zip
        raise MissingFileError(f"no core.yaml in {bundle_dir}. Fix: pass the bundle directory itself, the "
                               "one that holds core.yaml, eval_meta_data.csv and eval_data/")
    entries = []
    for root, _, files in os.walk(bundle_dir):
        rel = os.path.relpath(root, bundle_dir).replace(os.sep, "/")
        folder = "eval_bundle/" if rel == "." else f"eval_bundle/{rel}/"
        entries.append((folder, None))
        entries.extend((folder + name, os.path.join(root, name)) for name in files)
    with atomic_open(zip_path, "wb") as f, zipfile.ZipFile(f, "w") as zf:
        for arcname, path in sorted(entries):
            info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE)
            info.create_system = 3  # unix, so the permission bits below mean the same everywhere
            if path is None:
                info.external_attr = (0o40755 << 16) | 0x10  # directory
                zf.writestr(info, b"")
                continue
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(path, "rb") as src:
                zf.writestr(info, src.read(), compresslevel=9)
    return zip_path


@exit_on_setup_error("eval_bundle_zip")
def main(argv=None):
    parser = argparse.ArgumentParser(description="Zip an eval bundle directory reproducibly")
    parser.add_argument("bundle_dir", help="the directory that holds core.yaml directly")
    parser.add_argument("zip_path", help="where to write the zip (e.g. data/eval_bundle.zip)")
    args = parser.parse_args(argv)
    print(write_eval_bundle_zip(args.bundle_dir, args.zip_path))


if __name__ == "__main__":
    main()
