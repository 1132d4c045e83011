# histoscan model server: CPU inference, non-root, model folder mounted at /model.
#   docker build -t histoscan .
#   docker run -p 8000:8000 -v $PWD/runs/NAME:/model:ro histoscan
# GPU: build FROM an NVIDIA CUDA runtime image with Python, install torch's CUDA build, run with
#   --gpus all, and pass --backend torch --device cuda (see README, "Serving").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch torchvision \
 && pip install . \
 && useradd --create-home --uid 10001 histoscan
USER histoscan
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"
CMD ["histoscan", "serve", "/model", "--host", "0.0.0.0", "--port", "8000"]
