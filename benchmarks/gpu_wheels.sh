#!/usr/bin/env bash
# Download, into .whl/, the wheels a CUDA machine with its own torch but no network needs
# for plantml's GPU checks (mlflow-skinny and what it imports, plus plantml's small
# dependencies). Python version and platform are the CUDA runner's (default: 3.12, x86_64).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl \
    alembic==1.20.1 annotated_types==0.8.0 cachetools==7.3.3 cffi==2.1.1 cryptography==50.0.2 \
    databricks_sdk==0.162.0 fastapi==0.165.0 gitdb==4.0.12 gitpython==3.2.1 google_auth==2.63.0 greenlet==3.2.5 \
    importlib_metadata==9.1.0 mako==1.4.3 mirakuru==3.1.0 mlflow_skinny==3.17.2 mlflow_tracing==3.17.2 \
    opentelemetry_api==1.45.2 opentelemetry_proto==1.45.2 opentelemetry_sdk==1.45.2 \
    opentelemetry_semantic_conventions==0.66b2 port_for==1.1.1 pyasn1==0.6.5 pyasn1_modules==0.4.2 \
    pycparser==3.12 pydantic==2.14.4 pydantic_core==2.50.5 python_dotenv==1.2.4 smmap==5.0.3 \
    sqlalchemy==2.1.9 sqlparse==0.6.1 starlette==1.10.0 tenacity==9.2.1 typing_inspection==0.4.5 uvicorn==0.54.0
