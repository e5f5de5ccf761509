"""The upload server worker (`cdi-uploadserver`): settings, resumable staging, the aiohttp app.

The entry point is `importer.uploadserver`; the bytes go through the importer's pipeline
(`importer.pipeline.ImportRun`) with the request body as its source (`importer.sources.upload`).
"""
