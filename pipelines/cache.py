"""Stage `cache`: decode every manifest image once at the working size (and its true lung mask, where the source has
one), with :func:`covidcxr.preprocess.read_working_image`, the decode and transform serving applies to every request.
Every model stage reads this cache, except the projection filter's (stage `cache_projection`)."""

from __future__ import annotations

from pipelines import _cache, _common


def run(p: dict) -> None:
    _cache.write(_common.CACHE_DIR, p["size"], p["workers"], _common.setup_logging())


if __name__ == "__main__":
    run(_common.params("cache"))
    _common.finish()
