"""What Velero keeps in its bucket, read with boto3 (never written: Velero marks a location
invalid when it finds foreign files under its prefix)."""

from __future__ import annotations

import gzip
import json

from core.errors import NovaDRError


class VeleroBucket:
    def __init__(self, session, bucket: str, prefix: str = ""):
        from botocore.config import Config

        self.s3 = session.client("s3", config=Config(retries={"max_attempts": 3, "mode": "standard"}))
        self.bucket, self.prefix = bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""

    def _err(self, what: str, err: Exception) -> NovaDRError:
        code = getattr(err, "response", {}).get("Error", {}).get("Code", type(err).__name__)
        return NovaDRError(f"bucket {self.bucket}: {what} failed ({code})")

    def check_exists(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise NovaDRError(f"bucket {self.bucket} does not exist at {self.s3.meta.endpoint_url}; create it "
                                  "first (Velero does not); nothing was changed") from None
            raise self._err("head_bucket", err) from None
        except BotoCoreError as err:
            raise self._err("head_bucket", err) from None

    def has(self, key: str) -> bool:
        return bool(self.keys(key, limit=1))

    def keys(self, prefix: str, limit: int = 1000) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            r = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + prefix, MaxKeys=limit)
        except (ClientError, BotoCoreError) as err:
            raise self._err(f"listing {self.prefix + prefix}", err) from None
        return [o["Key"][len(self.prefix):] for o in r.get("Contents", [])]

    def read(self, key: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._err(f"reading {self.prefix + key}", err) from None
        except BotoCoreError as err:
            raise self._err(f"reading {self.prefix + key}", err) from None

    def read_json(self, key: str, gz: bool = False) -> dict | None:
        raw = self.read(key)
        if raw is None:
            return None
        try:
            return json.loads(gzip.decompress(raw) if gz else raw)
        except (OSError, ValueError) as err:
            raise NovaDRError(f"bucket {self.bucket}: {self.prefix + key} is not readable JSON ({err})") from None
