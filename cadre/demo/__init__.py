"""Data of the demo team: the ICD-10-CM medical-coding specialist (`cadre.demo.icd10`)."""
