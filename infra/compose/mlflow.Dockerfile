# MLflow's server with the drivers its stores need (PostgreSQL, S3), installed when the image is built, not each
# time the container starts.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.10 boto3==1.40.45
