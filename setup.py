"""Maps the top-level folders onto one `puremesh.*` namespace (see README, "Layout").

Static metadata lives in pyproject.toml; only the package map is computed here, so that a new
sub-package is picked up without editing a list.
"""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
# namespace prefix -> folder. Generated protobuf code keeps its proto package names
# (puremesh.<svc>.v1), so protos/puremesh/ maps straight onto puremesh.
ROOTS = {
    "puremesh.cli": "cli",
    "puremesh.services": "services",
    "puremesh.trainer": "trainer",
    "puremesh.rpc": "rpc",
    "puremesh.contract": "contract",
    "puremesh.weightsync": "weightsync",
    "puremesh.tinyworld": "tinyworld",
    "puremesh.supervised": "supervised",
    "puremesh": "protos/puremesh",
}


def discover() -> tuple[list[str], dict[str, str]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for prefix, folder in ROOTS.items():
        package_dir[prefix] = folder
        for init in sorted((HERE / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(HERE / folder)
            packages.append(".".join([prefix, *rel.parts]))
    return packages, package_dir


packages, package_dir = discover()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"puremesh.cli.examples": ["*.json"]},
    include_package_data=False,
)
