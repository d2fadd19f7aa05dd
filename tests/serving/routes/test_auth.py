"""The API key in-process (FastAPI's TestClient): it guards prediction and the model routes, in either
header, and leaves health, readiness and metrics open."""
import numpy as np

from tests.helpers import in_process

API_KEY = "test-key-123"


def test_api_key_guards_prediction_and_model_routes(exports):
    with in_process(exports, api_key=API_KEY) as c:
        body = {"pixels": [np.zeros((8, 8)).tolist()]}
        assert c.post("/predict", json=body).status_code == 401
        assert c.post("/predict", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.post("/predict", json=body, headers={"X-API-Key": API_KEY}).status_code == 200
        assert c.post("/predict", json=body, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert c.get("/models").status_code == 401 and "API key" in c.get("/models").json()["error"]
        assert c.get("/v2/models/digits-cnn").status_code == 401
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        assert c.get("/metrics").status_code == 200
