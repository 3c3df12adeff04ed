from django.urls import path

from datasets import views

app_name = "datasets"

urlpatterns = [
    path("p/<slug:slug>/datasets/", views.browse, name="browse"),
    path("p/<slug:slug>/datasets/preview/", views.preview, name="preview"),
    path("p/<slug:slug>/datasets/download/", views.download, name="download"),
    path("p/<slug:slug>/datasets/folders/", views.create_folder, name="create-folder"),
    path("p/<slug:slug>/datasets/delete/", views.delete, name="delete"),
    path("p/<slug:slug>/datasets/uploads/start/", views.upload_start, name="upload-start"),
    path("p/<slug:slug>/datasets/uploads/part/", views.upload_part, name="upload-part"),
    path("p/<slug:slug>/datasets/uploads/complete/", views.upload_complete, name="upload-complete"),
    path("p/<slug:slug>/datasets/uploads/abort/", views.upload_abort, name="upload-abort"),
]
