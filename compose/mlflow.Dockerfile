# MLflow tracking server image for the plantml compose stack (and, later, container tests).
# The design's bare python:3.9-slim has neither psycopg2 (PostgreSQL backend) nor boto3 (S3 artifacts).
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --no-cache-dir \
        "mlflow==${MLFLOW_VERSION}" \
        psycopg2-binary \
        boto3

RUN useradd --create-home --uid 1000 mlflow
USER mlflow
WORKDIR /home/mlflow

EXPOSE 5000

# A plain CMD (no ENTRYPOINT): compose and container tests replace it with their own server command.
# This default keeps everything local to the container (SQLite store, local artifacts).
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "1"]
