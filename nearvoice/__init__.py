"""nearvoice: edge delivery of AI speech.

The code lives in the repository's top-level folders, which this package names:
`nearvoice.edge` (the node), `nearvoice.origin` (the origin tier), `nearvoice.export` (the
model export step) and `nearvoice.bench` (the benchmarks). The default configs ship as
package data under `nearvoice/configs`. See docs/architecture.md.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nearvoice")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"
