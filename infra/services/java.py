"""Finding a JDK and the jars Maven fetched for the JVM services."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

from infra.services.base import ServiceError
from infra.settings import PROJECT_ROOT

JVM_ROOT = Path("/usr/lib/jvm")


def java_major(java: Path) -> int | None:
    """The feature version of a `java` binary (17, 21, 25, ...)."""
    release = java.parent.parent / "release"
    text = release.read_text() if release.exists() else ""
    match = re.search(r'JAVA_VERSION="(\d+)', text)
    if match is None:
        try:
            out = subprocess.run(
                [str(java), "-version"], capture_output=True, text=True, timeout=20
            ).stderr
        except OSError:
            return None
        match = re.search(r'version "(\d+)', out)
    return int(match.group(1)) if match else None


def find_java(minimum: int, preferred: Path | None = None) -> Path:
    """A `java` of at least `minimum`: the configured JDK, then PATH, then /usr/lib/jvm."""
    candidates: list[Path] = []
    if preferred is not None:
        candidates.append(preferred / "bin" / "java")
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(on_path).resolve())
    if JVM_ROOT.is_dir():
        candidates.extend(sorted(JVM_ROOT.glob("*/bin/java"), reverse=True))
    for java in candidates:
        if java.is_file() and (java_major(java) or 0) >= minimum:
            return java
    raise ServiceError(
        f"no JDK {minimum} or newer found (looked at {', '.join(map(str, candidates)) or 'none'}); "
        f"install one (apt-get install openjdk-17-jdk-headless gives 17) or point "
        f"FLEET_JAVA_HOME / FLEET_REGISTRY_JAVA_HOME at it"
    )


def maven_fetch(pom: Path, goal: str, output_dir: Path, properties: dict[str, str]) -> None:
    """Run a Maven goal that fills a git-ignored lib folder, unless it already ran for this pom.

    A stamp named after the pom's digest marks a complete fetch, so a version bump in the pom
    fetches again; Maven's ~/.m2 keeps what it downloaded, so a second clone fetches nothing.
    """
    stamp = output_dir / f".fetched-{hashlib.sha256(pom.read_bytes()).hexdigest()[:12]}"
    if stamp.exists():
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError("Maven (mvn) is not installed: apt-get install maven")
    if output_dir.exists():
        shutil.rmtree(output_dir)  # a stale or partial fetch: start clean
    argv = [mvn, "-q", "-B", "-f", str(pom), *(f"-D{k}={v}" for k, v in properties.items()), goal]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=PROJECT_ROOT)
    if result.returncode != 0 or not output_dir.is_dir():
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise ServiceError(
            f"download of {pom.parent.name} from Maven Central failed "
            f"({' '.join(argv)}, exit {result.returncode}):\n{tail}"
        )
    stamp.touch()
