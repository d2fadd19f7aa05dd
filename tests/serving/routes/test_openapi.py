"""The OpenAPI document in-process (FastAPI's TestClient): real request and response schemas, and /docs
served. Fuzzing a real server from this document: tests/serving/test_schema_fuzz.py."""


def test_openapi_documents_real_schemas(client):
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert {"application/json", "multipart/form-data"} <= set(predict["requestBody"]["content"])
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("PredictResponse")
    assert "/v2/models/{name}/infer" in spec["paths"]
    assert client.get("/docs").status_code == 200
