"""Where consoled's packages are; everything else is declared in pyproject.toml.

The alembic environment lives at the top level of the checkout (sql/) and is
shipped inside the wheel as consoled/sql, so one function
(consoled.store.schema.migrations_directory) finds it in both places.
consoled/web holds data only (the pages consoled serves): found as a
namespace package, its files are declared in pyproject.toml's package-data.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(include=["consoled", "consoled.*"], exclude=["*.__pycache__"]),
        "consoled.sql",
        "consoled.sql.versions",
        "twisted.plugins",
    ],
    package_dir={"consoled.sql": "sql", "consoled.sql.versions": "sql/versions"},
)
