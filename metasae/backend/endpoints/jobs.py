"""GET /v1/jobs, GET /v1/jobs/{job_id} (progress, result when done), DELETE /v1/jobs/{job_id} (cancel)."""

from __future__ import annotations

from fastapi import APIRouter

from metasae.backend.deps import JobsDep
from metasae.backend.schemas import JobResponse

router = APIRouter(tags=["stitching"])


@router.get("/jobs", response_model=list[JobResponse], summary="all jobs still kept (results left out)")
def list_jobs(jobs: JobsDep) -> list[dict]:
    return [j.to_dict() | {"result": None} for j in jobs.all()]


@router.get("/jobs/{job_id}", response_model=JobResponse, summary="a job's status, progress and result")
def get_job(job_id: str, jobs: JobsDep) -> dict:
    return jobs.get(job_id).to_dict()


@router.delete("/jobs/{job_id}", response_model=JobResponse, summary="cancel a job")
def cancel_job(job_id: str, jobs: JobsDep) -> dict:
    return jobs.cancel(job_id).to_dict()
