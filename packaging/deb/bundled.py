"""Facts about the Python distributions bundled into dist/llmd, for packaging/build.sh.

    bundled.py SITE --list                          name==version  license  (one line each)
    bundled.py SITE --min-glibc                     highest manylinux glibc any wheel needs (2.17)
    bundled.py SITE --copyright TEMPLATE [--exclude NAME]
        TEMPLATE (llmd's own copyright) followed by one section per bundled distribution with its
        version, license and license text. Texts of licenses that Debian ships in
        /usr/share/common-licenses are referenced there instead of repeated (Debian policy 12.5).

SITE is the ``pip install --target`` directory that build.sh hands to shiv. Only the standard
library is used: this runs in the build venv.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib.metadata import Distribution, distributions
from pathlib import Path

COMMON_LICENSES = Path("/usr/share/common-licenses")
# License names as packages spell them -> the file Debian ships for it.
_COMMON = {
    "apache-2.0": "Apache-2.0",
    "apache software license": "Apache-2.0",
    "apache 2": "Apache-2.0",
    "apache 2.0": "Apache-2.0",
    "apache license 2.0": "Apache-2.0",
    "apache license, version 2.0": "Apache-2.0",
    "mpl-2.0": "MPL-2.0",
    "mozilla public license 2.0 (mpl 2.0)": "MPL-2.0",
}
_LICENSE_FILE = re.compile(r"^(licen[cs]e|copying|notice|authors)", re.I)


def _dists(site: Path, exclude: set[str]) -> list[Distribution]:
    found = {}
    for d in distributions(path=[str(site)]):
        name = d.metadata["Name"]
        if name and name.lower() not in exclude:
            found[name.lower()] = d
    return [found[k] for k in sorted(found)]


def license_of(d: Distribution) -> str:
    """The license as the metadata states it: SPDX expression, short License field, or classifiers."""
    md = d.metadata
    expr = md.get("License-Expression")
    if expr:
        return expr.strip()
    text = (md.get("License") or "").strip()
    if text and "\n" not in text and len(text) <= 80:
        return text
    classifiers = [c.split("::")[-1].strip() for c in md.get_all("Classifier") or [] if c.startswith("License ::")]
    if classifiers:
        return " / ".join(classifiers)
    return "see the license text below"


def license_texts(d: Distribution) -> list[tuple[str, str]]:
    """(file name, text) of the license files shipped in the distribution's .dist-info."""
    out = []
    for f in d.files or []:
        parts = f.parts
        in_info = parts and parts[0].endswith(".dist-info")
        if in_info and (_LICENSE_FILE.match(f.name) or (len(parts) > 2 and parts[1] == "licenses")):
            text = Path(str(f.locate())).read_text(encoding="utf-8", errors="replace")
            if text and text.strip():
                out.append((f.name, text))
    return out


def _common_license(lic: str) -> str | None:
    name = _COMMON.get(lic.lower())
    return name if name and (COMMON_LICENSES / name).exists() else None


def _is_apache_text(text: str) -> bool:
    return "Apache License" in text and "Version 2.0, January 2004" in text and "TERMS AND CONDITIONS" in text


def _deb_text(text: str) -> str:
    """Text as a copyright-file block: every line indented, empty lines as ' .'."""
    lines = [ln.rstrip().expandtabs() for ln in text.strip("\n").splitlines()]
    return "\n".join(f" {ln}" if ln else " ." for ln in lines)


def copyright_file(site: Path, template: Path, exclude: set[str]) -> str:
    parts = [template.read_text().rstrip("\n")]
    parts.append(
        "\nThird-party code bundled in /usr/bin/llmd (a zipapp; each distribution\n"
        "unpacks into the shiv cache on first run):"
    )
    apache_ref = (" On Debian systems, the complete text of the Apache License 2.0 can be found in\n"
                  " /usr/share/common-licenses/Apache-2.0.")
    for d in _dists(site, exclude):
        lic = license_of(d)
        texts = license_texts(d)
        section = [f"\n{d.metadata['Name']} {d.version}", f"License: {lic}"]
        if not texts and (common := _common_license(lic)):
            section.append(f" On Debian systems, the complete text of the license can be found in\n"
                           f" /usr/share/common-licenses/{common}.")
        for name, text in texts:
            # Debian ships the Apache-2.0 text; copyright files refer to it instead of repeating it
            # (a NOTICE file, which section 4d says must travel with the code, is kept).
            body = apache_ref if _is_apache_text(text) else _deb_text(text)
            section.append(f" --- {name} ---\n{body}")
        parts.append("\n".join(section))
    return "\n".join(parts) + "\n"


def min_glibc(site: Path) -> str:
    best = (2, 17)  # manylinux2014, the oldest tag current wheels use
    for wheel_file in site.glob("*.dist-info/WHEEL"):
        for m in re.finditer(r"^Tag: .*manylinux_(\d+)_(\d+)_", wheel_file.read_text(), re.M):
            best = max(best, (int(m[1]), int(m[2])))
    return f"{best[0]}.{best[1]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("site", type=Path)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true")
    mode.add_argument("--min-glibc", action="store_true")
    mode.add_argument("--copyright", type=Path, metavar="TEMPLATE")
    ap.add_argument("--exclude", action="append", default=[])
    args = ap.parse_args(argv)
    exclude = {e.lower() for e in args.exclude}
    if args.list:
        for d in _dists(args.site, exclude):
            print(f"{d.metadata['Name']}=={d.version}  {license_of(d)}")
    elif args.min_glibc:
        print(min_glibc(args.site))
    else:
        sys.stdout.write(copyright_file(args.site, args.copyright, exclude))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
